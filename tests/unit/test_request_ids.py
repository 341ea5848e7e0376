import uuid

from web.gateway import new_request_id, valid_request_id


def test_generated_request_ids_are_distinct_uuid4s_in_canonical_form():
    ids = [new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
        assert valid_request_id(text) == text
