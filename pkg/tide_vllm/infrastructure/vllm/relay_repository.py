"""RelayRepository on vLLM: any request of vLLM's API, sent as it came. The client translates
the HTTP libraries' errors into the domain's; vLLM's own answers, its errors included, are
answers and go back to the caller as they are."""

from __future__ import annotations

from tide_vllm.domain.chat.entity import RelayRequest
from tide_vllm.domain.chat.repository import RelayAnswer

from .vllm_client import VLLMClient


class VLLMRelayRepository:
    def __init__(self, client: VLLMClient) -> None:
        self.client = client

    async def open(self, request: RelayRequest) -> RelayAnswer:
        return await self.client.open(
            request.method, request.target, request.headers, request.body, request.request_id
        )
