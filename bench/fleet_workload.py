"""The fleet benchmark's workload (issue 16), as data: no network, no clock.

Groups of users share a long system prompt (the prefix a cache-aware router should keep on one
replica); each user holds a multi-turn conversation. Every text is pseudo-text drawn from a
fixed vocabulary by a seeded generator, so two runs (and two machines) send the same prompts,
and the comparison between routers is not blurred by different requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common English words: the demo model's tokenizer makes about one token of each (with its
# leading space), so a prompt's length in tokens follows its length in words.
VOCABULARY = tuple(
    """
    the of and to in is that for it as was with be by on not he this are or his from at which
    but have an they you were her she there one all we their can has more will would been if
    when who so no time into only other new some could these two may then first any like now
    my such over our even most made after also did many before must through back years where
    much your way well down should because each just those people how too little state good
    very make world still own see men work long here get both between life being under never
    day same another know while last might us great old year off come since against go came
    right used take three states himself few house use during without again place around
    however home small found thought went say part once general high upon school every does
    got united left number course war until always away something fact water though less
    public put think almost hand enough far took head yet government system better set told
    nothing night end why called eyes find going look asked later knew point next city give
    group toward young days let room president side social present given several order
    national second possible rather per face among form important often things looked early
    white case john become large big need four within felt along children saw best church
    ever least power development light thing family interest want members mind country area
    others done turned although open problem sense service certain kind different thus began
    door help means whole matter perhaps itself york times human law line above name example
    action company hands local show whether five history gave today either act feet across
    taken past quite anything seen having death week experience body word half really field
    """.split()
)
SYSTEM_WORDS = 830  # ~920 tokens with the ChatML header, for SmolLM2's tokenizer (checked)
QUESTION_WORDS = 30
SEED = 16  # the number: any fixed value gives the same workload on every run


def pseudo_text(rng: random.Random, words: int) -> str:
    """`words` words of the vocabulary, as sentences of 8 to 15 words."""
    out: list[str] = []
    sentence: list[str] = []
    length = rng.randint(8, 15)
    for _ in range(words):
        sentence.append(rng.choice(VOCABULARY))
        if len(sentence) == length:
            out.append(" ".join(sentence).capitalize() + ".")
            sentence, length = [], rng.randint(8, 15)
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


@dataclass(frozen=True)
class User:
    """One conversation: its group's system prompt and one question per turn."""

    user_id: str
    group: int
    system_prompt: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    """Who talks, in which order, how fast: users start `stagger` s apart (in `users`' order)
    and wait `think` s after each answer before the next turn."""

    name: str
    users: tuple[User, ...]
    turns: int
    max_tokens: int = 16
    stagger: float = 0.5
    think: float = 2.0

    @property
    def requests(self) -> int:
        return len(self.users) * self.turns

    @property
    def groups(self) -> int:
        return len({user.group for user in self.users})


def system_prompt(group: int, words: int = SYSTEM_WORDS, seed: int = SEED) -> str:
    """Group `group`'s system prompt: differs from every other group's from its first words,
    so no two groups share a cached block."""
    rng = random.Random(f"{seed}/system/{group}")
    return f"You are the assistant of team {group}. " + pseudo_text(rng, words)


def question(group: int, user: int, turn: int, seed: int = SEED) -> str:
    rng = random.Random(f"{seed}/question/{group}/{user}/{turn}")
    return pseudo_text(rng, QUESTION_WORDS).rstrip(".") + "?"


def build_workload(
    name: str,
    users_per_group: list[int],
    turns: int,
    *,
    seed: int = SEED,
    system_words: int = SYSTEM_WORDS,
) -> Workload:
    """Groups of the given sizes; users ordered by a seeded shuffle, so that neither groups
    nor the order of arrival line up with a round robin over two replicas by construction."""
    users = []
    for group, count in enumerate(users_per_group):
        prompt = system_prompt(group, system_words, seed)
        for index in range(count):
            questions = tuple(question(group, index, turn, seed) for turn in range(turns))
            users.append(User(f"g{group}-u{index}", group, prompt, questions))
    random.Random(f"{seed}/order/{name}").shuffle(users)
    return Workload(name, tuple(users), turns)


def standard_workloads(quick: bool = False) -> list[Workload]:
    """The issue's two workloads (4 groups x 4 users and the hot spot 10+2+2+2, 6 turns), or
    the smoke run's one group of 2 users with 2 turns."""
    if quick:
        return [build_workload("quick", [2], 2)]
    return [
        build_workload("shared-prefix", [4, 4, 4, 4], 6),
        build_workload("hot-spot", [10, 2, 2, 2], 6),
    ]


def messages(user: User, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """The conversation sent at `turn`: the system prompt, every earlier question with the
    model's real answer to it, then this turn's question."""
    out = [{"role": "system", "content": user.system_prompt}]
    for done in range(turn):
        out.append({"role": "user", "content": user.questions[done]})
        out.append({"role": "assistant", "content": answers[done]})
    out.append({"role": "user", "content": user.questions[turn]})
    return out


def request_body(model: str, user: User, turn: int, answers: list[str], max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": messages(user, turn, answers),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
