#!/usr/bin/env python3
"""A fake vLLM server executable for supervisor and fault tests (never for end-to-end tests).

Takes vLLM's flags (it uses --port and --served-model-name and ignores the rest) and behaves
as FAKE_VLLM_MODE says, a comma-separated list of:
  delay=S          wait S seconds before listening (a slow model load)
  never_ready      never listen
  exit=N           print a line and exit with code N during start-up
  ignore_sigterm   ignore SIGTERM (the supervisor must SIGKILL)
  grandchild       fork a child process that sleeps, in the same process group (and ignores
                   SIGTERM too with ignore_sigterm)
  stubborn_grandchild  fork a child that ignores SIGTERM while this server exits on it (a stuck
                   EngineCore under an API server that stops cleanly)
  die_after=S      exit with code 9 S seconds after becoming ready
  die_once=S       the same, but only the first time (a marker file beside the pid file)
  deaf_after=S     S seconds after becoming ready, stop answering (the process stays)
  shutdown_noise   on SIGTERM, print what vLLM prints when it is stopped (its [shutdown] lines,
                   an ERROR with a traceback, a bare traceback, a leak report), then exit 0
  startup_log=S    print a start-up like vLLM's (its log format, a Python warning, a progress
                   bar, a traceback without a level, a PyTorch C++ line), pausing S seconds
                   while "loading the weights" (shard 1 of 2)
It prints what it does in vLLM's log format, `(APIServer pid=N) INFO 11-29 16:05:01
[fake_vllm.py:1] message`, and writes an access-log line per request the way vLLM's uvicorn
does, leaving out the paths of --disable-access-log-for-endpoints as vLLM does.
FAKE_VLLM_PIDFILE, if set, gets one pid per line appended: this process, then any grandchild.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def vlog(level: str, message: str, process: str = "APIServer", source: str = "fake_vllm.py:1"):
    """A line in vLLM's log format."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"({process} pid={os.getpid()}) {level} {stamp} [{source}] {message}", flush=True)


def print_startup(pause: float) -> None:
    """What a real vLLM 0.32 prints while it starts, shortened."""
    vlog("INFO", "non-default args: {'model': 'fake'}", source="api_utils.py:286")
    vlog(
        "WARNING",
        "Found ulimit of 20000 and failed to automatically increase",
        source="system_utils.py:255",
    )
    print("/x/vllm/entrypoints/fake.py:24: FutureWarning: a warning of Python's", flush=True)
    print("  warnings.warn(", flush=True)
    vlog(
        "INFO",
        "Initializing a V1 LLM engine (v0.32.0) with config: model='fake'",
        "EngineCore",
        "core.py:133",
    )
    vlog("INFO", "Starting to load model fake...", "Worker", "cpu_model_runner.py:68")
    print(
        "Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]", flush=True
    )
    print(
        "Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01,  1.00s/it]",
        flush=True,
    )
    time.sleep(pause)
    print(
        "Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:02<00:00,  1.00s/it]",
        flush=True,
    )
    vlog("INFO", "Loading weights took 2.37 seconds", "Worker", "default_loader.py:501")
    vlog("INFO", "CPU KV cache size: 46,592 tokens", "EngineCore", "kv_cache_utils.py:2327")
    print("Traceback (most recent call last):", flush=True)
    print('  File "/x/fake.py", line 1, in <module>', flush=True)
    print("ValueError: a traceback printed without a level", flush=True)
    print(
        "[W1129 16:08:30.649042915 utils.cpp:68] Warning: NUMA binding (a PyTorch C++ line)",
        flush=True,
    )
    vlog(
        "INFO",
        "init engine (profile, create kv cache, warmup model) took 8.51 s",
        "EngineCore",
        "core.py:402",
    )
    vlog("INFO", "Starting vLLM server on http://fake", source="entry.py:140")


def stop_noisily() -> None:
    """What vLLM 0.32 printed when its group got SIGTERM (seen on a real stop), shortened."""
    vlog("INFO", "[shutdown] API server: shutdown triggered", source="launcher.py:254")
    vlog(
        "WARNING",
        "[shutdown] Process manager: force killing remaining process EngineCore",
        source="utils.py:653",
    )
    for text in (
        "AsyncLLM output_handler failed.",
        "Traceback (most recent call last):",
        '  File "/x/vllm/v1/engine/async_llm.py", line 849, in output_handler',
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
    ):
        vlog("ERROR", text, source="async_llm.py:906")
    print("Traceback (most recent call last):", flush=True)
    print('  File "/x/vllm/v1/engine/core.py", line 1, in run', flush=True)
    print("KeyboardInterrupt", flush=True)
    print("nanobind: leaked 4 instances!", flush=True)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default="fake-model")
    parser.add_argument("--disable-access-log-for-endpoints", default="")
    args, _ = parser.parse_known_args()
    quiet_paths = set(filter(None, args.disable_access_log_for_endpoints.split(",")))
    modes = dict(
        (m.split("=", 1) + [""])[:2] for m in os.environ.get("FAKE_VLLM_MODE", "").split(",") if m
    )
    pidfile = os.environ.get("FAKE_VLLM_PIDFILE")
    pids = [os.getpid()]
    vlog("INFO", f"fake vLLM starting, pid {os.getpid()}, argv {' '.join(sys.argv[1:])}")
    if "ignore_sigterm" in modes:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "shutdown_noise" in modes:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop_noisily())
    if "grandchild" in modes or "stubborn_grandchild" in modes:
        ignore = (
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            if "ignore_sigterm" in modes or "stubborn_grandchild" in modes
            else ""
        )
        child = subprocess.Popen(
            [sys.executable, "-c", f"import signal, time; {ignore}time.sleep(1000)"]
        )
        pids.append(child.pid)
    if pidfile:
        with open(pidfile, "a") as f:
            f.write("\n".join(map(str, pids)) + "\n")
    if "exit" in modes:
        vlog("ERROR", "fake vLLM: model could not be loaded")
        sys.exit(int(modes["exit"]))
    if "never_ready" in modes:
        while True:
            time.sleep(1)
    time.sleep(float(modes.get("delay") or 0))
    if "startup_log" in modes:
        print_startup(float(modes["startup_log"] or 0))
    model = args.served_model_name

    class Handler(BaseHTTPRequestHandler):
        def log_request(self, code="-", size="-"):  # as vLLM's uvicorn logs a request
            if self.path.split("?")[0] not in quiet_paths:
                host, port = self.client_address[:2]
                print(f'INFO:     {host}:{port} - "{self.requestline}" {int(code)}', flush=True)

        def log_message(self, *a):  # quiet
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            elif self.path == "/health":
                self._send(200, {})
            else:
                self._send(
                    404,
                    {
                        "error": {
                            "message": "not found",
                            "type": "NotFoundError",
                            "param": None,
                            "code": 404,
                        }
                    },
                )

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if body.get("model") != model:
                self._send(
                    404,
                    {
                        "error": {
                            "message": f"The model `{body.get('model')}` does not exist.",
                            "type": "NotFoundError",
                            "param": "model",
                            "code": 404,
                        }
                    },
                )
                return
            last = body["messages"][-1]["content"]
            self._send(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"fake answer to: {last}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
                },
            )

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    vlog("INFO", f"fake vLLM ready on port {args.port}", source="entry.py:140")
    print("INFO:     Application startup complete.", flush=True)
    if "die_once" in modes and pidfile and not os.path.exists(pidfile + ".died"):
        open(pidfile + ".died", "w").close()
        modes["die_after"] = modes["die_once"]
    if "die_after" in modes:
        threading.Timer(float(modes["die_after"]), lambda: os._exit(9)).start()
    if "deaf_after" in modes:

        def deafen() -> None:
            server.shutdown()
            server.server_close()

        threading.Timer(float(modes["deaf_after"]), deafen).start()
    server.serve_forever()
    while True:  # deaf: alive, but nobody answers
        time.sleep(1)


if __name__ == "__main__":
    main()
