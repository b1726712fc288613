"""Reading and writing official DINOv2 weight files, and unwrapping training checkpoints.

Files: ``.npz``, ``.safetensors`` (numpy API of the ``safetensors`` package) and ``.pth``/``.pt``
(PyTorch, imported only when such a file is read or written: ``pip install 'medjax[torch]'``).
Training checkpoints hold several networks; :func:`select_part` picks one of them (the teacher's
backbone by default) and returns a plain state dict with official key names.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

_TORCH_EXTS = (".pth", ".pt")
_EXTS = (".npz", ".safetensors") + _TORCH_EXTS
_ROLES = ("teacher", "student")
# blocks.{chunk}.{block}.rest (block_chunks > 0): the block index is global, the chunk index is dropped.
_CHUNKED = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)$")


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTS:
        raise ValueError(f"{path}: unknown weights file extension {ext!r}; use one of {', '.join(_EXTS)}.")
    return ext


def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch file and PyTorch is not installed: pip install 'medjax[torch]', "
                          "or convert the file to .npz or .safetensors where torch is available.") from None
    return torch


def read_weights(source: Any) -> Mapping[str, Any]:
    """A mapping as is; otherwise the contents of a weights file (values may still be torch tensors)."""
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file.")
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    torch = _import_torch(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def write_weights(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a flat state dict of numpy arrays; the format follows the extension."""
    path = os.fspath(path)
    ext = _extension(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if ext == ".npz":
        with open(path, "wb") as f:  # np.savez would append .npz to any other name
            np.savez(f, **arrays)
    elif ext == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, path)
    else:
        torch = _import_torch(path)
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)


def to_numpy(value: Any) -> np.ndarray:
    """float32 numpy array from a numpy/jax array or a torch tensor (bf16/fp16 included)."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def _unchunk(state_dict: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in state_dict.items():
        m = _CHUNKED.match(key)
        new = f"blocks.{m.group(2)}.{m.group(3)}" if m else key
        if new in out:
            raise ValueError(f"Block key {new!r} appears twice after removing the block-chunk index from {key!r}.")
        out[new] = value
    return out


def _strip(state_dict: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def select_part(obj: Mapping[str, Any], part: str = "backbone", which: str = "teacher") -> dict:
    """Official state dict of one network (``backbone``, ``dino_head`` or ``ibot_head``).

    Accepts a plain state dict; a training checkpoint ``{"model": {"teacher.backbone.…", …}}``;
    an evaluation checkpoint ``{"teacher": {"backbone.…", "dino_head.…"}}``; or flat keys with
    those prefixes. ``module.`` prefixes and block-chunk indices are removed. Values are returned
    as they are (see :func:`to_numpy`).
    """
    if which not in _ROLES:
        raise ValueError(f"which={which!r}; use 'teacher' or 'student'.")
    if not isinstance(obj, Mapping):
        raise ValueError(f"The weights are a {type(obj).__name__}, not a state dict (a mapping of key to array).")
    sd, training = obj, False
    if isinstance(sd.get("model"), Mapping):
        sd, training = sd["model"], True
    roles = [r for r in _ROLES if isinstance(sd.get(r), Mapping)]
    if roles:
        if which not in roles:
            raise ValueError(f"The checkpoint holds only the {roles[0]} networks; pass which={roles[0]!r}.")
        sd, training = {f"{which}.{k}": v for k, v in sd[which].items()}, True
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    prefixed = {r for r in _ROLES if any(k.startswith(f"{r}.") for k in sd)}
    if prefixed:
        picked = _strip(sd, f"{which}.{part}.")
        if not picked:
            present = sorted(r for r in prefixed if any(k.startswith(f"{r}.{part}.") for k in sd))
            if present:
                raise ValueError(f"The training checkpoint has no {which} {part} ({which}.{part}.* keys); "
                                 f"pass which={present[0]!r}.")
            raise ValueError(f"The training checkpoint has neither a teacher nor a student {part} "
                             f"(no 'teacher.{part}.*' or 'student.{part}.*' keys).")
    elif any(k.startswith(f"{part}.") for k in sd):
        picked = _strip(sd, f"{part}.")
    elif part == "backbone" and (not training or "cls_token" in sd):
        picked = dict(sd)
    else:
        raise ValueError(f"The checkpoint has neither a teacher nor a student {part} "
                         f"(no 'teacher.{part}.*', 'student.{part}.*' or '{part}.*' keys).")
    return _unchunk(picked) if part == "backbone" else picked
