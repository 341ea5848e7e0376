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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default="fake-model")
    args, _ = parser.parse_known_args()
    modes = dict(
        (m.split("=", 1) + [""])[:2] for m in os.environ.get("FAKE_VLLM_MODE", "").split(",") if m
    )
    pidfile = os.environ.get("FAKE_VLLM_PIDFILE")
    pids = [os.getpid()]
    print(f"INFO fake vLLM starting, pid {os.getpid()}, argv {' '.join(sys.argv[1:])}", flush=True)
    if "ignore_sigterm" in modes:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        print("ERROR fake vLLM: model could not be loaded", flush=True)
        sys.exit(int(modes["exit"]))
    if "never_ready" in modes:
        while True:
            time.sleep(1)
    time.sleep(float(modes.get("delay") or 0))
    model = args.served_model_name

    class Handler(BaseHTTPRequestHandler):
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
    print(f"INFO fake vLLM ready on port {args.port}", flush=True)
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
