"""Write tests/fixtures/official_train_configs.json: every key of the official DINOv2 train configs.

The official trainer reads ``dinov2/configs/ssl_default_config.yaml`` and merges a train config
over it (OmegaConf.merge: the file's keys replace the defaults'). This script does the same merge
for ``configs/train/vitl14.yaml``, ``vitl16_short.yaml`` and ``vitg14.yaml`` and writes the
flattened result (``section.key -> value``), which ``tests/pretrain/test_official_configs.py``
compares with medjax's variants of the same names. Regenerate by hand from a clone of
facebookresearch/dinov2 (any environment with PyYAML):

    python tests/reference/make_official_config_table.py PATH/TO/dinov2
"""

import json
import pathlib
import subprocess
import sys

import yaml

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "official_train_configs.json"
TRAIN_CONFIGS = ("vitl14", "vitl16_short", "vitg14")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def main(repo: str):
    configs = pathlib.Path(repo) / "dinov2" / "configs"
    default = yaml.safe_load((configs / "ssl_default_config.yaml").read_text())
    table = {name: flatten(merge(default, yaml.safe_load((configs / "train" / f"{name}.yaml").read_text())))
             for name in TRAIN_CONFIGS}
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    OUT.write_text(json.dumps({"source": f"facebookresearch/dinov2 {commit}".strip(), "configs": table},
                              indent=1) + "\n")
    print(f"wrote {OUT}: {', '.join(f'{n} ({len(t)} keys)' for n, t in table.items())}")


if __name__ == "__main__":
    main(sys.argv[1])
