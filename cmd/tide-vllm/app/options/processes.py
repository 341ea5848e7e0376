"""Process facts read from /proc now live in tide_vllm.infrastructure.vllm.processes; this name
stays for plugin_web_handler.py until it imports them from there."""

from tide_vllm.infrastructure.vllm.processes import command_line, listening_pids

__all__ = ["command_line", "listening_pids"]
