"""The official facebookresearch/dinov2 training step on the CPU, at ``configs/dinov2_reg.py:bench`` shapes.

A side-by-side reference for medjax's DINOv2 (with registers) step time and FLOPs, made of the official
PyTorch code: ``SSLMetaArch`` (student, teacher, heads, losses, ``forward_backward``),
``collate_data_and_cast`` and ``MaskingGenerator`` set up as ``train.py`` does, ``get_params_groups``, and
``train.py``'s ``build_optimizer`` / ``apply_optim_scheduler``; its config is ``ssl_default_config.yaml``
merged (OmegaConf) with ``OVERRIDES`` below. Run from the repository root with a Python that has torch and
omegaconf (not medjax dependencies; this file imports neither jax nor medjax)::

    python -m medjax.bench.dinov2_official --dinov2-src ../dinov2 [--steps 10] [--threads 2]

``--dinov2-src`` is a checkout of https://github.com/facebookresearch/dinov2 with register tokens, put first
on sys.path (the PyPI ``dinov2`` 0.0.1.dev2 has none). When torch, omegaconf or that source is missing it
prints one line saying what and how to get it, and exits 0. The test suite does not import this file.

Bench model and recipe (``OVERRIDES`` below; float32): ViT 192 wide, 4 blocks, 3 heads, patch 14, 4 registers,
1 channel, drop path 0.1 in every block; 16 images of 2 global 112 px + 4 local 56 px crops; one DINO head
shared with iBOT with 4096 prototypes; the default recipe otherwise (softmax centering, KoLeo 0.1, iBOT masks
on half the global crops, AdamW over the official groups with layer-wise lr decay 0.9 and patch embedding
lr x 0.2, gradient norm clipped to 3 per student module). Fixed schedule values: lr 0.004 * sqrt(16 / 1024)
by the official scaling rule (the last layer too: no freeze), weight decay 0.04, teacher temperature 0.04
(its warm-up value), teacher momentum 0.992. The official arch table has no ViT this small, so ``vit_tiny``
(``vit_small``'s code at 192/4/3, with ``in_chans=1``, which ``build_model`` does not pass) is added to it.

One timed step is the body of the official ``do_train`` loop (the data, random images through the official
collate, is made once beforehand; 2 untimed warm-up steps)::

    apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)   # includes loss.backward()
    for v in model.student.values(): clip_grad_norm_(v.parameters(), 3.0)
    optimizer.step()
    model.update_teacher(momentum)

Printed: seconds per step, images/s, each step's total loss (it should fall), the iBOT masked patch count
and the collate's upperbound (the head inputs are padded to it), parameter counts, and FlopCounterMode FLOPs
(matmuls, convolutions, attention; no elementwise ops) of one step, and of its forward pass by module. Torch
has FLOP formulas for the CUDA attention kernels only; here they are mapped onto the CPU flash kernel.

Shims, none of which changes the math:
  * No xformers (no CPU kernels). ``XFORMERS_DISABLED`` is set: attention is ``MemEffAttention``'s own
    fallback (``scaled_dot_product_attention``), the iBOT loss the repository's plain-torch ``lossfunc``.
    ``ssl_meta_arch.py`` uses ``fmha.BlockDiagonalMask.from_tensor_list`` only to run the student head once
    over the concatenated local CLS, global CLS and masked patch tokens: a stand-in concatenates the same
    way and its ``split`` cuts the output back.
  * The student gets ``[global crops, local crops]``; the official ``forward_features_list`` hands the list
    to each ``NestedTensorBlock``, whose nested path runs all crops as one block-diagonal xformers attention.
    Here that path runs each crop group by itself (block-diagonal attention is per-crop attention) with its
    training stochastic depth: per group, each residual is computed on a random int(0.9 B) of the B crops and
    index-added scaled by B / int(0.9 B), by the repository's ``drop_add_residual_stochastic_depth`` (with
    LayerScale in the residual, where the nested path applies it in ``scaled_index_add``).
  * No FSDP: of ``prepare_for_distributed_training`` only the teacher-from-student copy is done.
    ``update_teacher`` collects parameters through FSDP modules, so it is replaced by its own two
    ``torch._foreach`` ops over the plain parameters (teacher = m teacher + (1 - m) student); the CUDA stream
    sync after the backward is off; clipping is ``torch.nn.utils.clip_grad_norm_`` per student module (as
    the loop's FSDP ``clip_grad_norm_``); no fp16 grad scaler, and the collate casts to float32 (the official
    loop casts to half for FSDP's mixed precision).
  * CPU: ``Tensor.cuda`` returns the tensor itself (``forward_backward`` moves its inputs with ``.cuda()``);
    a one-process gloo group, so the centering all-reduces run.
  * ``fvcore`` (checkpointing), ``torchvision`` (image pipeline; an installed one may not fit this torch)
    and, if absent, ``PIL`` are stand-in modules for the imports of ``train.py`` and ``dinov2.data``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import sys
import time
import types
import warnings

DEPTH, EMBED_DIM, NUM_HEADS, IN_CHANS = 4, 192, 3, 1
OVERRIDES = {  # configs/dinov2_reg.py:bench, in ssl_default_config.yaml's keys
    "compute_precision": {"grad_scaler": False},
    "student": {"arch": "vit_tiny", "patch_size": 14, "drop_path_rate": 0.1, "drop_path_uniform": True,
                "layerscale": 1.0e-5, "ffn_layer": "mlp", "block_chunks": 0, "num_register_tokens": 4,
                "interpolate_antialias": True, "interpolate_offset": 0.0},
    "crops": {"global_crops_size": 112, "local_crops_size": 56, "local_crops_number": 4},
    "dino": {"loss_weight": 1.0, "head_n_prototypes": 4096, "head_bottleneck_dim": 256, "head_nlayers": 3,
             "head_hidden_dim": 2048, "koleo_loss_weight": 0.1},
    "ibot": {"loss_weight": 1.0, "mask_sample_probability": 0.5, "mask_ratio_min_max": [0.1, 0.5],
             "separate_head": False},
    "train": {"batch_size_per_gpu": 16, "centering": "centering"},
}
TEACHER_TEMP, MOMENTUM, WEIGHT_DECAY = 0.04, 0.992, 0.04


def _skip(message: str) -> None:
    print(f"SKIP dinov2_official: {message}")
    sys.exit(0)


class _StubType(type):
    def __getattr__(cls, name):  # any class attribute (transforms.InterpolationMode.BICUBIC)
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub


class _Stub(metaclass=_StubType):
    """Any name from an unused import: a class taking any arguments, with any class attribute."""

    def __init__(self, *args, **kwargs):
        pass


def _stub_module(name: str, **attrs) -> None:
    """A stand-in package; given ``attrs`` it holds only those (other imports from it fail, as if absent)."""
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so submodule imports resolve through sys.modules
    if not attrs:
        module.__getattr__ = lambda key: getattr(_Stub, key)
    module.__dict__.update(attrs)
    sys.modules[name] = module


class _ConcatBias:
    """Stands in for xformers' BlockDiagonalMask as ssl_meta_arch.py uses it: concatenate, then split back."""

    def __init__(self, shapes):
        self.shapes = shapes  # (batch, tokens) of each input

    @classmethod
    def from_tensor_list(cls, tensors):
        import torch

        return cls([t.shape[:2] for t in tensors]), torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], 1)

    def split(self, x):
        parts = x.split([b * n for b, n in self.shapes], dim=1)
        return [p.reshape(b, n, *p.shape[2:]) for p, (b, n) in zip(parts, self.shapes)]


def _install_shims() -> None:
    import torch

    os.environ["XFORMERS_DISABLED"] = "1"
    warnings.filterwarnings("ignore", message="xFormers is")
    warnings.filterwarnings("ignore", category=FutureWarning)  # weight_norm, torch.cuda.amp.autocast
    _stub_module("xformers")
    _stub_module("xformers.ops", fmha=types.SimpleNamespace(BlockDiagonalMask=_ConcatBias))
    stubs = ["fvcore", "fvcore.common", "fvcore.common.checkpoint",
             "torchvision", "torchvision.transforms", "torchvision.datasets"]
    for name in stubs + (["PIL"] if importlib.util.find_spec("PIL") is None else []):
        _stub_module(name)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU only: the inputs already live here


def _check_inputs(args) -> None:
    for module, how in (("torch", "pip install torch==2.13.0 numpy` (a CPU build will do)"),
                        ("numpy", "pip install numpy`"), ("omegaconf", "pip install omegaconf`")):
        if importlib.util.find_spec(module) is None:
            _skip(f"{module} is not installed; get it with `{how}.")
    needed = ("dinov2/train/ssl_meta_arch.py", "dinov2/configs/ssl_default_config.yaml",
              "dinov2/models/vision_transformer.py", "dinov2/data/collate.py")
    missing = [p for p in needed if not (args.dinov2_src and os.path.isfile(os.path.join(args.dinov2_src, p)))]
    if not missing and "num_register_tokens" not in open(os.path.join(args.dinov2_src, needed[2])).read():
        missing = ["register tokens in dinov2/models/vision_transformer.py (an old checkout)"]
    if missing:
        _skip(f"the official DINOv2 source is missing ({', '.join(missing)} under --dinov2-src={args.dinov2_src!r}); "
              "get it with `git clone https://github.com/facebookresearch/dinov2 ../dinov2` and pass --dinov2-src "
              "../dinov2.")


def _patch_official(vits, block_mod) -> None:
    """The registered ``vit_tiny`` and the per-crop-group nested block path described in the docstring."""
    from functools import partial

    from dinov2.layers import MemEffAttention

    def vit_tiny(patch_size=16, num_register_tokens=0, **kwargs):
        return vits.DinoVisionTransformer(
            patch_size=patch_size, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=NUM_HEADS, mlp_ratio=4,
            in_chans=IN_CHANS, block_fn=partial(vits.Block, attn_class=MemEffAttention),
            num_register_tokens=num_register_tokens, **kwargs)

    vits.vit_tiny = vit_tiny

    def forward(self, x_or_list):
        plain = block_mod.Block.forward  # the single-tensor path, unchanged
        if not isinstance(x_or_list, list):
            return plain(self, x_or_list)
        if not (self.training and self.sample_drop_ratio > 0.0):
            return [plain(self, x) for x in x_or_list]  # the nested path's plain residuals, per group

        def attn_residual(x):
            return self.ls1(self.attn(self.norm1(x)))

        def ffn_residual(x):
            return self.ls2(self.mlp(self.norm2(x)))

        out = []
        for x in x_or_list:  # one crop group at a time; subsets drawn per group, as in the nested path
            x = block_mod.drop_add_residual_stochastic_depth(x, attn_residual, self.sample_drop_ratio)
            out.append(block_mod.drop_add_residual_stochastic_depth(x, ffn_residual, self.sample_drop_ratio))
        return out

    block_mod.NestedTensorBlock.forward = forward


def _flop_counter(model):
    """FlopCounterMode that also counts CPU flash attention (torch registers only the CUDA kernels), with
    modules named by their path in ``model`` (otherwise a module called directly is named by its class)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    counter = fc.FlopCounterMode(display=False, depth=None, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_val=None, **kwargs: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_val=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v)})
    counter.mod_tracker._get_mod_name(model)
    return counter


def _flop_lines(step_counter, forward_counter) -> list[str]:
    """The step's total, and its forward pass by module (not the backward: the module tracker keeps loss
    modules on its stack through the backward, so backward FLOPs land on the wrong modules)."""
    total, forward = step_counter.get_total_flops(), forward_counter.get_total_flops()
    lines = [f"step_gflop={total / 1e9:.4g}  (forward {forward / 1e9:.4g}, backward {(total - forward) / 1e9:.4g})",
             "forward_gflop_by_module:"]
    for name, ops in sorted(forward_counter.get_flop_counts().items()):
        parts = name.split(".")[1:]  # drop the root "SSLMetaArch"
        if 0 < len(parts) <= 2 or parts[-1:] == ["patch_embed"] and len(parts) == 3:
            by_op = ", ".join(f"{str(op).split('.')[1]} {n / 1e9:.3g}" for op, n in sorted(ops.items(), key=str))
            lines.append(f"  {'.'.join(parts):<28} {sum(ops.values()) / 1e9:8.4g}  ({by_op})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov2-src", default=None, help="a checkout of github.com/facebookresearch/dinov2")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--lr", type=float, default=None, help="default: the official sqrt-scaled base lr")
    args = parser.parse_args(argv)
    _check_inputs(args)

    _install_shims()
    sys.path.insert(0, os.path.abspath(args.dinov2_src))
    for name in [m for m in sys.modules if m == "dinov2" or m.startswith("dinov2.")]:
        del sys.modules[name]  # never mix with an installed dinov2

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import dinov2
    import dinov2.layers.block as block_mod
    import dinov2.models.vision_transformer as vits
    from dinov2.configs import dinov2_default_config
    from dinov2.data import MaskingGenerator, collate_data_and_cast
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import apply_optim_scheduler, build_optimizer
    from dinov2.utils.config import apply_scaling_rules_to_cfg

    assert os.path.dirname(os.path.dirname(dinov2.__file__)) == os.path.abspath(args.dinov2_src), dinov2.__file__
    _patch_official(vits, block_mod)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    cfg = OmegaConf.merge(OmegaConf.create(dinov2_default_config), OmegaConf.create(OVERRIDES))
    apply_scaling_rules_to_cfg(cfg)  # lr = base_lr * sqrt(batch / 1024)
    model = SSLMetaArch(cfg)
    for key in model.student.keys():  # prepare_for_distributed_training without the FSDP wrap
        model.teacher[key].load_state_dict(model.student[key].state_dict())
    model.need_to_synchronize_fsdp_streams = False  # the CUDA stream sync only FSDP needs

    def update_teacher(m):
        with torch.no_grad():
            teacher = [p for k in model.student.keys() for p in model.teacher[k].parameters()]
            student = [p for k in model.student.keys() for p in model.student[k].parameters()]
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1 - m)

    model.update_teacher = update_teacher
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())

    img_size, patch_size = cfg.crops.global_crops_size, cfg.student.patch_size  # as train.py sets them up:
    n_tokens = (img_size // patch_size) ** 2
    mask_generator = MaskingGenerator(input_size=(img_size // patch_size, img_size // patch_size),
                                      max_num_patches=0.5 * img_size // patch_size * img_size // patch_size)
    batch = cfg.train.batch_size_per_gpu
    samples = [({"global_crops": [torch.randn(IN_CHANS, img_size, img_size) for _ in range(2)],
                 "local_crops": [torch.randn(IN_CHANS, cfg.crops.local_crops_size, cfg.crops.local_crops_size)
                                 for _ in range(cfg.crops.local_crops_number)]}, ()) for _ in range(batch)]
    data = collate_data_and_cast(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                                 mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                                 n_tokens=n_tokens, mask_generator=mask_generator)
    lr = cfg.optim.lr if args.lr is None else args.lr

    def step() -> dict:
        apply_optim_scheduler(optimizer, lr, WEIGHT_DECAY, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_dict = model.forward_backward(data, teacher_temp=TEACHER_TEMP)
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        model.update_teacher(MOMENTUM)
        return {k: v.detach() for k, v in loss_dict.items()}

    loss_dicts = [step() for _ in range(args.warmup)]
    start = time.perf_counter()
    for _ in range(args.steps):
        loss_dicts.append(step())
    seconds = (time.perf_counter() - start) / max(args.steps, 1)
    losses = [sum(v.item() for v in d.values()) for d in loss_dicts]  # the official loop logs this sum
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss: {losses}")

    step_counter, forward_counter = _flop_counter(model), _flop_counter(model)
    with step_counter:
        step()
    model.backprop_loss = lambda loss: None  # forward only: the same forward_backward without its backward
    with forward_counter:
        model.forward_backward(data, teacher_temp=TEACHER_TEMP)

    print("\n".join([
        "impl=official_dinov2_pytorch", f"torch={torch.__version__}", "device=cpu",
        f"threads={torch.get_num_threads()}", f"batch={batch}", f"lr={lr:.3g}", f"sec_per_step={seconds:.4g}",
        f"images_per_sec={batch / seconds:.4g}", f"losses={' '.join(f'{x:.4f}' for x in losses)}",
        f"last_loss_terms={', '.join(f'{k} {v.item():.4g}' for k, v in loss_dicts[-1].items())}",
        f"masked_patches={data['mask_indices_list'].shape[0]} upperbound={data['upperbound']} "
        f"(of {data['collated_masks'].numel()} global-crop patches)",
        *(f"params_student_{k}={sum(p.numel() for p in m.parameters())}" for k, m in model.student.items())]))
    print("\n".join(_flop_lines(step_counter, forward_counter)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
