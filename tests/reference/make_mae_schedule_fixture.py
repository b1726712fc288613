"""Write tests/fixtures/mae_lr_schedule.npz: the official MAE learning rate at every iteration.

The official ``util/lr_sched.adjust_learning_rate(optimizer, epoch, args)`` is called once per
iteration with the fractional epoch ``data_iter_step / len(data_loader) + epoch``
(``engine_pretrain.py``); this script calls it the same way (it needs no torch: the optimizer is a
stand-in holding one param group) for a short schedule and saves every value:

    git clone https://github.com/facebookresearch/mae ../mae-src
    python tests/reference/make_mae_schedule_fixture.py --mae-src ../mae-src
"""

import argparse
import importlib.util
import os
import types

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "mae_lr_schedule.npz")
SETTINGS = dict(blr=1.5e-4, batch=64, epochs=12, warmup_epochs=3, min_lr=1e-6, iters_per_epoch=7)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mae-src", required=True, help="a checkout of facebookresearch/mae")
    path = os.path.join(parser.parse_args().mae_src, "util", "lr_sched.py")
    spec = importlib.util.spec_from_file_location("lr_sched", path)
    lr_sched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr_sched)
    s = SETTINGS
    args = types.SimpleNamespace(lr=s["blr"] * s["batch"] / 256, min_lr=s["min_lr"], epochs=s["epochs"],
                                 warmup_epochs=s["warmup_epochs"])
    optimizer = types.SimpleNamespace(param_groups=[{}])
    lrs = []
    for epoch in range(s["epochs"]):
        for it in range(s["iters_per_epoch"]):
            lrs.append(lr_sched.adjust_learning_rate(optimizer, it / s["iters_per_epoch"] + epoch, args))
    np.savez(FIXTURE, lr=np.asarray(lrs, np.float64), **{k: np.asarray(v) for k, v in s.items()})
    print(f"wrote {FIXTURE}: {len(lrs)} steps")


if __name__ == "__main__":
    main()
