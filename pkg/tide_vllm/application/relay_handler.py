"""The relay use case: every route of vLLM's API that the service does not serve itself goes to
vLLM as it came, once vLLM can serve."""

from __future__ import annotations

from tide_vllm.domain.chat.entity import EngineUnavailable, RelayRequest
from tide_vllm.domain.chat.repository import EngineMonitor, RelayAnswer, RelayRepository


class RelayHandler:
    def __init__(self, repository: RelayRepository, monitor: EngineMonitor) -> None:
        self.repository = repository
        self.monitor = monitor

    async def open(self, request: RelayRequest) -> RelayAnswer:
        status = self.monitor.current()
        if not status.accepts_requests:
            raise EngineUnavailable(status.detail or f"vLLM is {status.state.value}")
        return await self.repository.open(request)
