"""Write tests/fixtures/losses.npz: inputs and outputs of the reference DINOv2 losses.

The tests compare medjax's objectives with these numbers using numpy only, so
the test suite never needs torch. Regenerate by hand, in an environment
separate from medjax's:

    pip install torch==2.13.0 && pip install --no-deps dinov2==0.0.1.dev2
    python tests/reference/make_loss_fixtures.py

The reference modules are imported from the installed `dinov2` package; only
the few lines of arithmetic with which dinov2/train/ssl_meta_arch.py combines
them are restated here (line numbers are those of facebookresearch/dinov2 at
commit b8931f7; the PyPI copy has the same loss code, its ssl_meta_arch.py is
shifted by 3 lines). Inputs are small random head outputs with a fixed seed:
logits are cosines, as DINOHead produces (L2-normalised features times a
weight-normalised last layer).
"""

import importlib.util
import pathlib
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dinov2
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "losses.npz"

B = 6  # images per crop
N_LOCAL = 3
K = 96  # DINO prototypes
K_IBOT = 64  # iBOT prototypes
BOTTLENECK = 16
GRID = 6  # patches per side of a global crop
TEACHER_TEMP = 0.04
STUDENT_TEMP = 0.1
KOLEO_DIM = 24


def _load_reference_module(name):
    """Load dinov2/data/<name>.py alone: the dinov2.data package __init__ needs torchvision."""
    path = pathlib.Path(dinov2.__file__).parent / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dinov2_data_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head(features, prototypes):
    """Cosine logits, like DINOHead's last layer (zero features give zero logits)."""
    return F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).t()


def dino_terms(loss, teacher_probs_list, student_global, student_local, n_local):
    """ssl_meta_arch.py forward_backward, lines 147-148 and 278-309, with dino_loss_weight 1."""
    n_global = 2
    n_local_terms = max(n_local * n_global, 1)
    n_global_terms = (n_global - 1) * n_global
    local = torch.tensor(0.0)
    if n_local > 0:
        local = loss(student_local.chunk(n_local), teacher_probs_list) / (n_global_terms + n_local_terms)
    loss_scales = 2
    glob = loss([student_global], [teacher_probs_list.flatten(0, 1)]) * loss_scales / (n_global_terms + n_local_terms)
    return glob, local


def make_dino(rng, out):
    protos = torch.tensor(rng.normal(size=(K, BOTTLENECK)), dtype=torch.float32)
    teacher_feat = torch.tensor(rng.normal(size=(2 * B, BOTTLENECK)), dtype=torch.float32)
    teacher = head(teacher_feat, protos)  # rows: crop 0 of the B images, then crop 1
    noise = torch.tensor(rng.normal(size=(2 * B, BOTTLENECK)), dtype=torch.float32)
    student_global = head(teacher_feat + noise, protos)
    student_local = head(torch.tensor(rng.normal(size=(N_LOCAL * B, BOTTLENECK)), dtype=torch.float32), protos)
    center = torch.tensor(0.1 * rng.normal(size=(1, K)), dtype=torch.float32)

    loss = DINOLoss(K, student_temp=STUDENT_TEMP)
    loss.center = center.clone()
    probs = loss.softmax_center_teacher(teacher, teacher_temp=TEACHER_TEMP)
    loss.update_center(teacher)
    loss.apply_center_update()
    out["dino_softmax_probs"] = probs
    out["dino_center_updated"] = loss.center[0]
    out["dino_sinkhorn_probs"] = DINOLoss(K).sinkhorn_knopp_teacher(teacher, teacher_temp=TEACHER_TEMP)

    # ssl_meta_arch.py lines 162-164: teacher crops are stacked in reverse so that A meets B.
    c0, c1 = teacher.chunk(2)
    reversed_teacher = torch.cat((c1, c0))
    loss = DINOLoss(K, student_temp=STUDENT_TEMP)
    loss.center = center.clone()
    # lines 200-202 (centering) and 213-215 (sinkhorn_knopp): probabilities viewed as (2, B, K).
    centered = loss.softmax_center_teacher(reversed_teacher, teacher_temp=TEACHER_TEMP).view(2, B, K)
    sinkhorn = loss.sinkhorn_knopp_teacher(reversed_teacher, teacher_temp=TEACHER_TEMP).view(2, B, K)
    for mode, probs_list in (("centering", centered), ("sinkhorn", sinkhorn)):
        glob, local = dino_terms(loss, probs_list, student_global, student_local, N_LOCAL)
        out[f"dino_{mode}_global"], out[f"dino_{mode}_local"] = glob, local
    glob, _ = dino_terms(loss, centered, student_global, student_local[:0], 0)
    out["dino_centering_global_no_local"] = glob

    out.update(
        dino_teacher_logits=teacher,
        dino_student_global_logits=student_global,
        dino_student_local_logits=student_local,
        dino_center=center[0],
        dino_n_local=np.int32(N_LOCAL),
    )


def make_ibot(rng, out):
    masking = _load_reference_module("masking")
    collate = _load_reference_module("collate")
    n_tokens = GRID * GRID
    generator = masking.MaskingGenerator(input_size=(GRID, GRID), max_num_patches=0.5 * n_tokens)
    crop = torch.zeros(1, 1, 1)
    samples = [({"global_crops": [crop, crop], "local_crops": [crop] * N_LOCAL}, None) for _ in range(B)]
    # train.py builds the collate with mask_ratio_min_max (0.1, 0.5) and mask_sample_probability 0.5.
    batch = collate.collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens, generator)
    masks = batch["collated_masks"]  # (2B, N): crop 0 of all images, then crop 1
    indices = batch["mask_indices_list"]
    weights = batch["masks_weight"]
    upperbound = batch["upperbound"]
    n_masked = indices.shape[0]

    protos = torch.tensor(rng.normal(size=(K_IBOT, BOTTLENECK)), dtype=torch.float32)
    teacher_tokens = torch.tensor(rng.normal(size=(2 * B * n_tokens, BOTTLENECK)), dtype=torch.float32)
    student_tokens = teacher_tokens + torch.tensor(rng.normal(size=teacher_tokens.shape), dtype=torch.float32)
    # lines 184-194 and 253-262: masked tokens gathered into zero buffers of `upperbound` rows, then the head.
    teacher_buffer = torch.zeros(upperbound, BOTTLENECK)
    teacher_buffer[:n_masked] = teacher_tokens[indices]
    student_buffer = torch.zeros(upperbound, BOTTLENECK)
    student_buffer[:n_masked] = student_tokens[indices]
    teacher_logits = head(teacher_buffer, protos)
    student_logits = head(student_buffer, protos)
    center = torch.tensor(0.1 * rng.normal(size=(1, 1, K_IBOT)), dtype=torch.float32)

    loss = iBOTPatchLoss(K_IBOT, student_temp=STUDENT_TEMP)
    loss.center = center.clone()
    # lines 205-210: softmax over the real masked rows, centre updated from them.
    masked_teacher = teacher_logits[:n_masked].unsqueeze(0)
    centered = loss.softmax_center_teacher(masked_teacher[:, :n_masked], teacher_temp=TEACHER_TEMP).squeeze(0)
    loss.update_center(masked_teacher[:n_masked])
    loss.apply_center_update()
    out["ibot_center_updated"] = loss.center[0, 0]
    # lines 218-222: Sinkhorn over the real masked rows with B = number of masked patches.
    sinkhorn = loss.sinkhorn_knopp_teacher(
        teacher_logits[:n_masked], teacher_temp=TEACHER_TEMP, n_masked_patches_tensor=torch.tensor([n_masked])
    )
    loss_scales, ibot_loss_scale = 2, 1.0 / 2  # lines 291 and 154
    for mode, probs in (("centering", centered), ("sinkhorn", sinkhorn)):
        value = loss.forward_masked(
            student_logits[:n_masked], probs, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=weights
        )
        out[f"ibot_{mode}_probs"] = probs
        out[f"ibot_{mode}_loss"] = value * loss_scales * ibot_loss_scale  # lines 324-334

    out.update(
        ibot_masks=masks,
        ibot_mask_indices=indices.to(torch.int32),
        ibot_mask_weights=weights,
        ibot_student_logits=student_logits,
        ibot_teacher_logits=teacher_logits,
        ibot_center=center[0, 0],
        ibot_n_images=np.int32(masks.shape[0]),
    )


def make_koleo(rng, out):
    x = torch.tensor(rng.normal(size=(2 * B, KOLEO_DIM)), dtype=torch.float32, requires_grad=True)
    loss = KoLeoLoss()
    full = loss(x)
    (grad,) = torch.autograd.grad(full, x)
    # lines 313-317: one KoLeo per global crop, summed (then times koleo_loss_weight = 0.1).
    chunked = sum(loss(p) for p in x.chunk(2))
    dup = x.detach().clone()
    dup[3] = dup[0]
    dup[7] = 2.0 * dup[5]
    out.update(
        koleo_x=x,
        koleo_loss=full,
        koleo_grad=grad,
        koleo_chunked_sum=chunked,
        koleo_dup_x=dup,
        koleo_dup_loss=loss(dup),
    )


def main():
    random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if not dist.is_initialized():  # the reference Sinkhorn all-reduces even on one process
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    out = {"teacher_temperature": np.float32(TEACHER_TEMP), "student_temperature": np.float32(STUDENT_TEMP)}
    make_dino(rng, out)
    make_ibot(rng, out)
    make_koleo(rng, out)
    arrays = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in out.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
