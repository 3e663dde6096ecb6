"""`python -m jtransfer finetune | predict | export`: fine-tuning from the shell.

`main(argv) -> exit code` is the whole CLI; `python -m jtransfer` calls it. Exit codes: 0 done,
1 failure (one line on stderr saying what and what to do; `--debug` adds the traceback), 2
usage error (argparse), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint.

Example:
    From the shell::

        $ python -m jtransfer finetune --data hotdog --arch resnet18 --weights IMAGENET1K_V1 \\
              --freeze none --head-lr-mult 10 --epochs 5 --out runs/hotdog
        $ python -m jtransfer predict --checkpoint runs/hotdog photo1.jpg photo2.jpg
        $ python -m jtransfer export --checkpoint runs/hotdog --out hotdog_resnet18.pth
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jtransfer._cliutil import freeze_rules, initial_variables, user_message
from jtransfer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    JTransferError,
    NonFiniteLossError,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROG = "python -m jtransfer"
DEFAULT_MAX_SKIPS = 10  # --skip-nonfinite without N; as jtransfer.fit.MAX_CONSECUTIVE_SKIPS
# --batch-dtype, the default first: uint8 batches are normalised inside the compiled step to
# the float32 path's bits, with a quarter of the bytes (docs/performance.md has the timings).
BATCH_DTYPES = ("uint8", "float32")

_DESCRIPTION = """\
Fine-tune torchvision ResNet / VGG models in JAX, predict with them, export them back to
PyTorch.

  finetune  train on an ImageFolder dataset (DATA/train and DATA/test or DATA/val), saving
            resumable checkpoints (Orbax) to --out
  predict   classify images with a checkpoint directory
  export    write a checkpoint as a torchvision state_dict (.pth)
  lr-find   sweep the learning rate exponentially on your freezing rules and suggest one

Run `%(prog)s COMMAND --help` for the options of each command.

Exit codes: 0 success; 1 failure (one line on stderr; add --debug for the traceback);
2 bad command line; 130 / 143 finetune stopped by Ctrl-C (SIGINT) / SIGTERM after saving a
checkpoint -- run the same command again to resume.
"""

_FINETUNE_DESCRIPTION = """\
Fine-tune a torchvision architecture on an image-folder dataset.

DATA holds train/ and test/ (or val/), each with one sub-folder per class, as for
torchvision.datasets.ImageFolder; both must have the same classes. The model's classifier
(ResNet `fc`, VGG `classifier.6`) is replaced by a new one with one output per class
(Xavier-uniform weight, zero bias), as in the d2l.ai hot-dog recipe.

If you know the PyTorch way:
  --weights IMAGENET1K_V1   torchvision.models.resnet50(weights="IMAGENET1K_V1"), or a local
                            .pth state_dict path, or "none" for random initialisation;
                            hf-hub:timm/resnet50.a1_in1k is timm.create_model(
                            "hf-hub:timm/resnet50.a1_in1k", pretrained=True) with timm's
                            preprocessing (its pretrained_cfg), recorded with the run
  --freeze backbone         for p in net.parameters(): p.requires_grad = False, then a new
                            net.fc (trainable): feature extraction. Frozen layers also keep
                            their BatchNorm running statistics (as net.eval() would) and cost
                            no backward pass. --freeze stem layer1 freezes just those stages
                            (they must be the first ones); --freeze none trains everything.
  --head-lr-mult 10         two optimizer param groups: [{"params": body, "lr": lr},
                            {"params": net.fc.parameters(), "lr": lr * 10}]
  --lr/--momentum/--weight-decay
                            torch.optim.SGD(lr=..., momentum=..., weight_decay=...) with the
                            same coupled weight decay; frozen layers never decay
  --loss-reduction mean     nn.CrossEntropyLoss() (the mean over the batch); "sum" is d2l's
                            l.sum().backward()
  --unfreeze-after 2        fastai's learn.fine_tune(epochs, freeze_epochs=2): the first 2
                            epochs train with --freeze applied, then p.requires_grad = True
                            for every layer (backbone at --lr, head at --lr x --head-lr-mult).
                            One compiled step serves both phases, so the frozen phase still
                            runs the backward pass through the frozen layers (their updates
                            are zero; BatchNorm keeps its statistics). Their momentum starts
                            at their first trained step, as in torch
  --skip-nonfinite          what torch.cuda.amp.GradScaler does with an inf/NaN gradient: skip
                            that optimizer.step() (and keep the BatchNorm statistics); the
                            epoch line counts skipped steps. Without it a NaN loss stops the
                            run, naming the step, and the last checkpoint stays a good one
  Training BatchNorm runs in train mode (net.train()); evaluation in eval mode.

Checkpoints: --out gets a checkpoint at the end of every epoch (the best by test accuracy
and the latest are kept) and every --save-every steps. Running the same command again with an
--out that already holds a checkpoint of the same configuration resumes from it ("resuming
from step N") and ends with exactly the parameters an uninterrupted run would have; a larger
--epochs continues training; an --unfreeze-after run resumes in the phase it was in (each
checkpoint records it: "frozen" or "unfrozen"). Ctrl-C (SIGINT) or SIGTERM saves a checkpoint,
prints the command to resume, and exits with 130 or 143.
"""

_PREDICT_DESCRIPTION = """\
Classify images with a finetune checkpoint directory (no PyTorch needed). Each image gets the
checkpoint's evaluation transform (resize, center crop, ImageNet normalisation), then one line
on stdout: PATH<TAB>CLASS<TAB>PROBABILITY. A directory argument means every image file under it.
An unreadable image is reported on stderr and the others are still classified (exit code 1).
"""

_EXPORT_DESCRIPTION = """\
Write a checkpoint as a torchvision state_dict:
  net = torchvision.models.ARCH(num_classes=N)
  net.load_state_dict(torch.load("model.pth", weights_only=True))   # strict=True works
The class names (index order) are printed, and written next to the file as model.json.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that end in a hint to --help (exit code 2, as argparse's)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m jtransfer`."""
    from jtransfer import models

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR|off",
        help="JAX persistent compilation cache: a restarted or repeated run loads its "
        "compiled steps instead of compiling them again (default: $JTRANSFER_COMPILE_CACHE, "
        "else ~/.cache/jtransfer/xla; off to disable)",
    )
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description=_DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ft = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a model on an image folder",
        description=_FINETUNE_DESCRIPTION,
        formatter_class=fmt,
    )
    ft.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="dataset folder with train/ and test/ (or val/) ImageFolder subfolders",
    )
    ft.add_argument(
        "--arch",
        default=None,
        choices=models.ARCHS,
        metavar="ARCH",
        help="architecture (default: the config.json's of timm --weights, else resnet18): "
        f"{', '.join(models.ARCHS)}",
    )
    ft.add_argument(
        "--weights",
        default="DEFAULT",
        metavar="PATH|TAG|hf-hub:ORG/NAME|none",
        help="starting weights: a local .pth/.safetensors state_dict, a torchvision "
        "tag (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; downloaded to torch's cache), "
        "a timm checkpoint on the Hugging Face hub (hf-hub:timm/resnet50.a1_in1k; its "
        "preprocessing is used) or in a local directory, or none for random init "
        "(default: DEFAULT)",
    )
    ft.add_argument(
        "--freeze",
        nargs="+",
        default=["none"],
        metavar="WHAT",
        help="none (train all; default), backbone (train only the new classifier), "
        "or the first stages to freeze: ResNet stem layer1 .. layer4, VGG block1 .. "
        "block5",
    )
    ft.add_argument(
        "--unfreeze-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="gradual unfreezing: train the first EPOCHS epochs with --freeze applied, then "
        "every layer (the unfrozen ones at --lr, the head at --lr x --head-lr-mult); needs "
        "--freeze other than none and EPOCHS < --epochs (default: --freeze holds throughout)",
    )
    ft.add_argument(
        "--head-lr-mult",
        type=float,
        default=10.0,
        metavar="X",
        help="learning-rate multiplier of the new classifier (default: 10)",
    )
    ft.add_argument(
        "--lr", type=float, default=1e-3, help="base learning rate of SGD (default: 0.001)"
    )
    ft.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    ft.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="coupled L2 weight decay, as torch.optim.SGD (default: 1e-4)",
    )
    ft.add_argument(
        "--loss-reduction",
        choices=("mean", "sum"),
        default="mean",
        help="cross-entropy over the batch: mean (torch default) or sum (d2l)",
    )
    ft.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    ft.add_argument("--epochs", type=int, default=5, help="epochs to train (default: 5)")
    ft.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="training crop / evaluation center-crop size (default: 224); the "
        "evaluation resize is 256/224 of it, as Resize([256,256]) + CenterCrop(224)",
    )
    ft.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the forward and backward computation: bfloat16 is mixed precision "
        "(parameters, optimizer state, BatchNorm statistics and the loss stay float32), "
        "meant for GPUs and TPUs; on the CPU it is slower than float32, even with AMX "
        "(docs/guides/precision.md) (default: float32)",
    )
    ft.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 precision of convolutions and matrix products: default is XLA's "
        "(TensorFloat-32 on NVIDIA GPUs since Ampere), highest is full float32 (slower on "
        "such GPUs; the same on the CPU) (default: default)",
    )
    ft.add_argument(
        "--batch-dtype",
        choices=BATCH_DTYPES,
        default=BATCH_DTYPES[0],
        help="how image batches travel to the device: uint8 pixels, normalised inside the "
        "compiled step (a quarter of the bytes), or float32 normalised by the loader; the "
        f"numbers are the same to the bit (default: {BATCH_DTYPES[0]})",
    )
    ft.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loading worker processes (default: 0, decode in this process)",
    )
    ft.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="check every image first and leave out unreadable ones (listed) "
        "instead of failing when one is reached",
    )
    ft.add_argument(
        "--skip-nonfinite",
        type=int,
        nargs="?",
        const=DEFAULT_MAX_SKIPS,
        default=None,
        metavar="N",
        help="skip a step whose loss, gradient or update is NaN or infinite (the model, optimizer "
        "state and BatchNorm statistics stay as before it) instead of stopping; the epoch "
        f"line counts them. Stops after N skipped steps in a row (default {DEFAULT_MAX_SKIPS}) "
        "or a whole epoch of them. May be added when resuming a run that stopped on a NaN",
    )
    ft.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="checkpoint directory (default: runs/ARCH); resumes if it already "
        "holds a checkpoint of the same configuration",
    )
    ft.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also save every STEPS steps (default: only at epoch ends)",
    )
    ft.add_argument(
        "--keep-best",
        type=int,
        default=1,
        metavar="K",
        help="keep the K best checkpoints by test accuracy, besides the latest (default: 1)",
    )
    ft.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of shuffling, augmentation, head init and dropout (default: 0)",
    )
    dist = ft.add_argument_group(
        "multi-process training (jax.distributed)",
        "Run the same command once per process (e.g. per host or GPU), adding its "
        "--process-id; --batch-size stays the global batch, and each process loads its share "
        "of it. Only process 0 prints. The settings may also come from JTRANSFER_COORDINATOR, "
        "JTRANSFER_NUM_PROCESSES and JTRANSFER_PROCESS_ID.",
    )
    dist.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (any free port)"
    )
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    dist.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let JAX detect the cluster (SLURM, Open MPI, Cloud TPU pod slices)",
    )

    # predict and export read the same checkpoint arguments.
    ckpt = argparse.ArgumentParser(add_help=False)
    ckpt.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="a finetune --out directory"
    )
    ckpt.add_argument(
        "--which",
        default="best",
        metavar="best|latest|STEP",
        help="which checkpoint: best by test accuracy (default), latest, or a step",
    )

    pr = sub.add_parser(
        "predict",
        parents=[common, ckpt],
        help="classify images with a checkpoint",
        description=_PREDICT_DESCRIPTION,
        formatter_class=fmt,
    )
    pr.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")

    ex = sub.add_parser(
        "export",
        parents=[common, ckpt],
        help="write a checkpoint as a torchvision .pth state_dict",
        description=_EXPORT_DESCRIPTION,
        formatter_class=fmt,
    )
    ex.add_argument("--out", required=True, metavar="FILE", help="the .pth file to write")

    from jtransfer import lr_find

    lr_find.add_parser(sub, parents=[common])
    return parser


# ---------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from jtransfer import lr_find

    commands = {
        "finetune": _finetune,
        "predict": _predict,
        "export": _export,
        "lr-find": lr_find.run,
    }
    from jtransfer import compile_cache

    compile_cache.enable(args.compile_cache)  # before anything compiles; warns if unwritable
    with warnings.catch_warnings(), _quiet_libraries(args.debug):
        try:
            return commands[args.command](args, argv)
        except KeyboardInterrupt:
            if args.debug:
                traceback.print_exc()
            print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        except Exception as e:  # noqa: BLE001 - the CLI turns every error into one line
            if args.debug:
                traceback.print_exc()
            print(f"{PROG} {args.command}: error: {_error_line(e, args)}", file=sys.stderr)
            return EXIT_FAILURE


_KNOWN = (JTransferError, OSError, MemoryError)


def _error_line(e: BaseException, args: argparse.Namespace) -> str:
    """The one line the CLI prints for `e`: in the command line's terms where they differ."""
    if isinstance(e, JTransferError):
        try:
            text = user_message(e, args)
        except Exception:  # noqa: BLE001 - never hide the error behind a bug in rewording it
            text = None
        if text:
            return text
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, JTransferError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if not isinstance(e, _KNOWN):
        text = f"unexpected {type(e).__name__}: {text} (a bug? rerun with --debug and report it)"
    return text or type(e).__name__


@contextlib.contextmanager
def _quiet_libraries(debug: bool):
    """Warnings as one `warning:` line each; absl (Orbax) logging only for errors.

    Call inside `warnings.catch_warnings()`, which restores the warning settings; the absl
    verbosity is restored here, so calling `main` in-process leaves no trace.
    """
    if debug:
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("default")
    # Library chatter that is not about the user's run.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------
# finetune


def _finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    args.arch = _weights_arch(args.arch, args.weights)
    _check_finetune_args(args)
    from jtransfer import distributed

    multi = distributed.initialize(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed_auto
    )
    # From here on a first SIGINT / SIGTERM only sets a flag: an interrupt raised inside
    # XLA compilation or an Orbax write can crash the process at exit.
    with contextlib.ExitStack() as stack:
        if multi and not distributed.is_main():  # only process 0 prints; errors still show
            stack.enter_context(
                contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w")))
            )
        return _run_finetune(args, argv, stack.enter_context(_SignalStop()))


def _run_finetune(args: argparse.Namespace, argv: Sequence[str], stopper: _SignalStop) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtransfer as jt
    from jtransfer import checkpoint, data, distributed, fit, partition, train

    n_proc = jax.process_count()
    if args.batch_size % n_proc:
        raise ConfigError(
            f"--batch-size {args.batch_size} (the global batch) must be a multiple of the "
            f"{n_proc} processes"
        )
    out = Path(args.out or f"runs/{args.arch}").expanduser()
    train_folder, test_folder = _dataset(Path(args.data).expanduser())
    classes = train_folder.classes
    num_classes = len(classes)
    rules = freeze_rules(args.arch, args.freeze, args.head_lr_mult)
    view = _preprocessing(args.weights, args.image_size)
    config = _config(args, classes)
    metadata = {
        "arch": args.arch,
        "num_classes": num_classes,
        "classes": classes,
        "image_size": args.image_size,
        "resize_size": view.to_dict()["resize_size"],
        "mean": list(view.mean),
        "std": list(view.std),
        "preprocessing": view.to_dict(),  # predict and export read it (Preprocessing)
        "config": config,
    }
    resuming = bool(checkpoint.checkpoint_steps(out))
    restarting = not resuming and out.is_dir()  # e.g. a run killed before its first save
    if resuming:
        _check_same_config(out, config)
    ckpt = checkpoint.Checkpointer(  # takes --out's lock: one writer per run directory
        out,
        command=f"{PROG} {shlex.join(argv)}",
        max_to_keep=1,
        best_metric="test_acc",
        best_mode="max",
        keep_best=args.keep_best,
        save_interval_steps=args.save_every,
        metadata=metadata,
    )
    hooks = _CheckpointHooks(
        ckpt,
        stopper,
        frozen=list(args.freeze) != ["none"],
        skip_nonfinite=args.skip_nonfinite is not None,
    )
    try:
        train_loader = data.make_loader(
            train_folder,
            batch_size=args.batch_size // n_proc,
            train=True,
            seed=args.seed,
            num_epochs=None,
            worker_count=args.workers,
            skip_bad_images=args.skip_bad_images,
            image_size=args.image_size,
            shard_options=distributed.process_shard_options() if n_proc > 1 else None,
            dtype=np.dtype(args.batch_dtype),
            **view.loader_kwargs(train=True),
        )
        test_loader = data.make_loader(
            test_folder,
            batch_size=args.batch_size,
            train=False,
            skip_bad_images=args.skip_bad_images,
            image_size=args.image_size,
            cache_eval=len(test_folder) * 3 * args.image_size**2 < 2**30,
            dtype=np.dtype(args.batch_dtype),
            **view.loader_kwargs(train=False),
        )
        for loader in (train_loader, test_loader):
            if loader.bad_files:
                print(
                    f"skipped {len(loader.bad_files)} unreadable image(s) in {loader.folder.root}"
                )
        spe = hooks.steps_per_epoch = train_loader.steps_per_epoch
        if args.unfreeze_after is not None:
            hooks.unfreeze_step = args.unfreeze_after * spe
            rules = freeze_rules(
                args.arch, args.freeze, args.head_lr_mult, unfreeze_step=hooks.unfreeze_step
            )
        hooks.loader_template = json.loads(iter(train_loader).get_state())
        print(
            f"{args.arch}, {num_classes} classes ({', '.join(classes)}): "
            f"{len(train_loader.samples)} training images ({spe} steps of {args.batch_size} "
            f"per epoch), {len(test_loader.samples)} test images; checkpoints in {out}"
        )
        model = jt.models.create(args.arch, num_classes=num_classes)
        optimizer = dict(
            learning_rate=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )

        def fresh_state(variables):
            tx = partition.make_optimizer(variables["params"], rules, **optimizer)
            return train.create_train_state(model, variables, tx, args.seed)

        variables, state, restored = None, None, None
        if resuming:
            x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
            shapes = dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
            restored = ckpt.restore_latest(jax.eval_shape(fresh_state, shapes))
        if restored is None:
            if restarting:
                print(f"no complete checkpoint in {out} yet: starting from scratch")
            variables = initial_variables(args, model, num_classes)
            print(partition.rules_table(variables["params"], rules))
            ckpt.check_space(jax.eval_shape(fresh_state, variables))
        else:
            state = restored.state
            done, index = divmod(restored.step, spe)
            where = f"step {index} of epoch {done + 1}" if index else f"end of epoch {done}"
            if hooks.unfreeze_step is not None:
                phase = hooks.phase(restored.step)
                _check_phase(restored, phase, args.unfreeze_after, spe)
                when = "until" if phase == "frozen" else "since"
                where += f"; {phase} phase {when} step {hooks.unfreeze_step}"
            print(f"resuming from step {restored.step} ({where}; --epochs {args.epochs}) in {out}")
            if restored.step >= args.epochs * spe:
                print(f"already trained for {args.epochs} epochs; nothing to do.")
                _print_next_steps(out)
                return EXIT_OK
        if not hooks.stop_requested():
            fit.fit(
                model,
                variables,
                rules,
                train_loader,
                test_loader,
                epochs=args.epochs,
                loss_reduction=args.loss_reduction,
                seed=args.seed,
                arch=args.arch,
                log=print,
                state=state,
                loader_state=None
                if restored is None
                else distributed.local_loader_state(restored.loader_state),
                on_step_end=hooks.on_step_end,
                on_epoch_end=hooks.on_epoch_end,
                skip_nonfinite=args.skip_nonfinite is not None,
                max_consecutive_skips=args.skip_nonfinite or DEFAULT_MAX_SKIPS,
                compute_dtype=jnp.bfloat16 if args.compute_dtype == "bfloat16" else None,
                precision=None if args.precision == "default" else args.precision,
                **optimizer,
            )
    except _Stopped:
        pass
    finally:
        ckpt.close()
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        if hooks.saved_step is None:
            saved = "before training started; nothing was saved"
        else:
            saved = f"at step {hooks.saved_step}; checkpoint saved in {out / str(hooks.saved_step)}"
        again = "Resume" if hooks.saved_step is not None else "Start again"
        print(
            f"{PROG} finetune: stopped by {name} {saved}. {again} with: {PROG} {shlex.join(argv)}",
            file=sys.stderr,
        )
        return 128 + stopper.signum
    print(f"done: {hooks.summary()}; checkpoints in {out} (best: step {ckpt.best_step()})")
    _print_next_steps(out)
    return EXIT_OK


class _Stopped(Exception):
    """Raised from a fit hook to stop training after a signal (the checkpoint is saved)."""


class _SignalStop:
    """Turns the first SIGINT / SIGTERM into a flag checked between steps; a second one kills."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # Second signal: quit now. os._exit, because unwinding from inside XLA or an
            # Orbax write can crash; a save in flight leaves only a temporary directory.
            print(f"\n{name} again: quitting without saving", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{name} received: stopping after the current step and saving a checkpoint "
            "(send it again to quit at once without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> _SignalStop:
        if threading.current_thread() is threading.main_thread():  # signals need the main one
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _CheckpointHooks:
    """fit's on_step_end / on_epoch_end: interval saves, epoch-end saves, save-on-signal.

    Each checkpoint records its phase: "frozen" while --freeze is in force for the next
    step, "unfrozen" once nothing is (from the start with --freeze none, from
    `unfreeze_step` with --unfreeze-after).
    """

    def __init__(
        self,
        ckpt,
        stopper: _SignalStop,
        *,
        frozen: bool = False,
        unfreeze_step: int | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        self.ckpt = ckpt
        self.stopper = stopper
        self.frozen = frozen  # --freeze is not none
        self.unfreeze_step = unfreeze_step
        self.skip_nonfinite = skip_nonfinite
        self.steps_per_epoch = 0  # set once the loader is built
        self.loader_template: dict[str, Any] = {}  # the loader's state minus its position
        self.position: bytes | None = None
        self.saved_step: int | None = None
        self.best: tuple[float, int] | None = None
        self.last: dict[str, Any] | None = None

    def on_step_end(self, state, info) -> None:
        # Batches are consumed one per step from batch 0 (or from a checkpoint saved with
        # its step), so the loader's next batch is the step count; fit's own report of the
        # position is used when it has one.
        self.position = (
            info.loader_state()
            or json.dumps({**self.loader_template, "next_batch": info.step}).encode()
        )
        # The epoch's last step is saved by on_epoch_end, with the test metrics.
        last_of_epoch = info.index + 1 == self.steps_per_epoch
        stop = self.stop_requested()
        due = stop or (not last_of_epoch and self.ckpt.should_save(info.step))
        if due:
            self._check_finite(state, info.step, info.metrics)
        if stop:
            self._save(state, info.epoch, force=True)
            self.ckpt.wait_until_finished()
            raise _Stopped
        if due:
            self._save(state, info.epoch, force=False)

    def on_epoch_end(self, epoch: int, state, entry: dict[str, Any]) -> bool:
        metrics = {
            k: entry[k]
            for k in ("test_acc", "test_loss", "train_acc", "train_loss")
            if entry.get(k) is not None
        }
        self._check_finite(state, entry["step"])
        self._save(state, epoch, force=True, metrics=metrics)
        self.last = entry
        if self.unfreeze_step is not None and entry["step"] == self.unfreeze_step:
            print(f"unfreezing: from step {self.unfreeze_step} every layer trains")
        if entry.get("test_acc") is not None and (
            self.best is None or entry["test_acc"] >= self.best[0]  # ties: the later, as Orbax
        ):
            self.best = (entry["test_acc"], entry["step"])
        if self.stop_requested():
            self.ckpt.wait_until_finished()
            return True
        return False

    def stop_requested(self) -> bool:
        """True once a signal arrived; in a multi-process run, at any process (all agree)."""
        import jax

        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            # Every process must stop (and save) at the same step, or the collectives hang.
            signums = multihost_utils.process_allgather(np.int32(self.stopper.signum or 0))
            if self.stopper.signum is None and np.max(signums) > 0:
                self.stopper.signum = int(np.max(signums))
        return self.stopper.signum is not None

    def _check_finite(self, state, step: int, metrics=None) -> None:
        """Refuses to save a state that a rerun could not train on, naming the step.

        fit checks a step's loss only while the next step runs, and a finite loss can still
        come with an update that overflows the parameters; either way the checkpoint a rerun
        resumes from must stay the last good one. With --skip-nonfinite the train step never
        lets a non-finite value into the state.
        """
        if self.skip_nonfinite:
            return
        from jtransfer import train

        if metrics is not None:
            train.check_finite(metrics, step - 1)
        if not bool(train.all_finite(state.params)):
            raise NonFiniteLossError(
                f"the update of step {step - 1} made parameters NaN or infinite (its loss was "
                f"finite); it was not saved, the last checkpoint is from before it. "
                f"{train.NONFINITE_ADVICE}"
            )

    def phase(self, step: int) -> str:
        """The phase after `step`: "frozen" while --freeze is in force, else "unfrozen"."""
        if not self.frozen or (self.unfreeze_step is not None and step >= self.unfreeze_step):
            return "unfrozen"
        return "frozen"

    def _save(self, state, epoch: int, *, force: bool, metrics=None) -> None:
        step = int(state.step)
        if self.ckpt.save(
            state,
            epoch=epoch,
            loader_state=self.position,
            phase=self.phase(step),
            metrics=metrics,
            force=force,
        ):
            self.saved_step = step

    def summary(self) -> str:
        if self.last is None:
            return "no epoch run"
        text = f"{self.last['epoch']} epochs, step {self.last['step']}"
        if self.best is not None:
            text += f", best test acc {self.best[0]:.3f} at step {self.best[1]}"
        return text


def _print_next_steps(out: Path) -> None:
    print(f"predict: {PROG} predict --checkpoint {shlex.quote(str(out))} IMAGE...")
    print(f"export:  {PROG} export --checkpoint {shlex.quote(str(out))} --out model.pth")


def _check_finetune_args(args: argparse.Namespace) -> None:
    positive = {
        "--batch-size": args.batch_size,
        "--epochs": args.epochs,
        "--image-size": args.image_size,
    }
    bad = [f"{flag} {value}" for flag, value in positive.items() if value < 1]
    if args.lr <= 0:
        bad.append(f"--lr {args.lr}")
    if args.save_every is not None and args.save_every < 1:
        bad.append(f"--save-every {args.save_every}")
    if args.workers < 0 or args.keep_best < 0 or args.seed < 0:
        bad.append("--workers, --keep-best and --seed must be >= 0")
    if bad:
        raise ConfigError(f"invalid value(s): {', '.join(bad)}; these must be positive")
    if args.image_size < 32:
        raise ConfigError(f"--image-size {args.image_size} is too small: use 32 or more")
    if args.skip_nonfinite is not None and args.skip_nonfinite < 1:
        raise ConfigError(
            f"--skip-nonfinite {args.skip_nonfinite}: the number of skipped steps in a row "
            f"that stops the run must be >= 1 (default {DEFAULT_MAX_SKIPS})"
        )
    _check_unfreeze_after(args.unfreeze_after, args.freeze, args.epochs)


def _check_unfreeze_after(epochs_frozen: int | None, freeze: Sequence[str], epochs: int) -> None:
    if epochs_frozen is None:
        return
    if list(freeze) == ["none"]:
        raise ConfigError(
            f"--unfreeze-after {epochs_frozen} needs something frozen first: add --freeze "
            "backbone (train only the new classifier, then everything) or --freeze with the "
            "first stages (e.g. --freeze stem layer1)"
        )
    if epochs_frozen < 1:
        raise ConfigError(
            f"--unfreeze-after {epochs_frozen}: the frozen phase must last at least 1 epoch; "
            "to train everything from the start use --freeze none"
        )
    if epochs_frozen >= epochs:
        raise ConfigError(
            f"--unfreeze-after {epochs_frozen} must be less than --epochs {epochs}, or nothing "
            f"is ever unfrozen: raise --epochs (e.g. --epochs {epochs_frozen + epochs}) or "
            "leave out --unfreeze-after"
        )


def _check_phase(restored, phase: str, unfreeze_after: int, steps_per_epoch: int) -> None:
    """The phase saved with a checkpoint must be the one its step has now (same data)."""
    if restored.phase is not None and restored.phase != phase:
        raise CheckpointError(
            f"the checkpoint of step {restored.step} was saved in the {restored.phase!r} phase, "
            f"but with --unfreeze-after {unfreeze_after} and {steps_per_epoch} steps per epoch "
            f"step {restored.step} is in the {phase!r} phase: the training set changed size. "
            "Resume with the same data, or choose a new --out"
        )


def _weights_arch(arch: str | None, weights: str) -> str:
    """--arch, else the architecture timm weights' config.json names, else resnet18."""
    if arch is not None or weights.lower() == "none":
        return arch or "resnet18"
    from porting import hub

    return (hub.config_arch(weights) if hub.is_timm_source(weights) else None) or "resnet18"


def _preprocessing(weights: str, image_size: int):
    """The view training and evaluation use: timm weights' own, else torchvision's (d2l)."""
    from jtransfer.preprocess import Preprocessing

    view = None
    if weights.lower() != "none":
        from porting import hub

        if hub.is_timm_source(weights):
            view = hub.preprocessing(weights, image_size)
    return view or Preprocessing.d2l(image_size)


def _dataset(root: Path):
    from jtransfer import data

    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"--data {root} {what}; pass a folder holding train/ and test/ (or val/) image "
            "folders (one sub-folder per class)"
        )
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"--data {root} must hold train/ and test/ (or val/) folders; it has "
            f"{found or 'no sub-folders'}"
        )
    train_folder, test_folder = data.ImageFolder(train_dir), data.ImageFolder(test_dir)
    data.check_same_classes(train_folder, test_folder)
    return train_folder, test_folder


def _config(args: argparse.Namespace, classes: list[str]) -> dict[str, Any]:
    """What must match for --out to be resumed (not --epochs, --workers, --save-every, nor
    --skip-nonfinite: adding it to resume a run that stopped on a NaN is its main use; nor
    --batch-dtype: uint8 and float32 batches train to the same bits)."""
    weights = args.weights
    hub_name = weights.startswith("hf-hub:")
    if weights.lower() != "none" and not hub_name and (os.sep in weights or Path(weights).suffix):
        weights = str(Path(weights).expanduser().absolute())
    return {
        "data": str(Path(args.data).expanduser().absolute()),
        "classes": classes,
        "arch": args.arch,
        "weights": weights,
        "freeze": list(args.freeze),
        "unfreeze_after": args.unfreeze_after,
        "head_lr_mult": args.head_lr_mult,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "loss_reduction": args.loss_reduction,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "skip_bad_images": args.skip_bad_images,
        "seed": args.seed,
        # Recorded only when not the default, so that runs from before these flags resume.
        **({"compute_dtype": args.compute_dtype} if args.compute_dtype != "float32" else {}),
        **({"precision": args.precision} if args.precision != "default" else {}),
    }


def _check_same_config(out: Path, config: dict[str, Any]) -> None:
    from jtransfer import checkpoint

    meta = None
    for step in reversed(checkpoint.checkpoint_steps(out)):
        try:
            meta = checkpoint.read_metadata(out, step)
            break
        except CheckpointError:  # unreadable: restore_latest warns about it and skips it
            continue
    if meta is None:
        return  # every checkpoint unreadable: restore_latest raises, listing why
    saved = meta.get("config")
    if saved is None:
        raise CheckpointError(
            f"--out {out} holds checkpoints not written by `{PROG} finetune`; choose another --out"
        )
    saved = json.loads(json.dumps(saved))
    current = json.loads(json.dumps(config))
    diff = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"--out {out} holds a checkpoint of a different run ({'; '.join(diff)}); pass the "
            "same options to resume it, or choose a new --out"
        )


# ---------------------------------------------------------------------------
# predict / export


def _which(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _image_paths(items: Sequence[str]) -> list[Path]:
    from jtransfer import data

    paths = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.name.lower().endswith(data.IMG_EXTENSIONS)
            )
            if not found:
                raise DataError(f"{p} holds no image files ({', '.join(data.IMG_EXTENSIONS)})")
            paths += found
        else:
            paths.append(p)
    return paths


def _predict(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import jax
    import numpy as np

    from jtransfer import checkpoint, data, models, train
    from jtransfer.preprocess import Preprocessing

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    paths = _image_paths(args.images)
    model, variables, meta = checkpoint.load_for_inference(args.checkpoint, _which(args.which))
    print(_reading(args, meta), file=sys.stderr)
    variables = models.prepare_inference(model, variables)  # kernel transforms once
    classes = meta.get("classes") or [str(i) for i in range(meta["num_classes"])]
    view = Preprocessing.from_metadata(meta)  # what training used; older runs: d2l's

    @jax.jit
    def probabilities(v, pixels):
        # uint8 pixels travel; the normalisation runs here, to the host transform's bits.
        x = train.normalize_images(pixels, view.mean, view.std)
        return jax.nn.softmax(model.apply(v, x, train=False).astype("float32"), axis=-1)

    size = min(args.batch_size, len(paths))
    failed = 0
    for start in range(0, len(paths), size):
        chunk, images = [], []
        for path in paths[start : start + size]:
            try:
                img = data.load_image(path)
            except DataError as e:
                print(f"{PROG} predict: error: {_error_line(e, args)}", file=sys.stderr)
                failed += 1
                continue
            chunk.append(path)
            images.append(view.eval_pixels(img))
        if not chunk:
            continue
        x = np.zeros((size, *images[0].shape), np.uint8)  # one batch shape: one compilation
        x[: len(images)] = np.stack(images)
        probs = np.asarray(probabilities(variables, x))[: len(chunk)]
        for path, p in zip(chunk, probs, strict=True):
            k = int(p.argmax())
            print(f"{path}\t{classes[k]}\t{p[k]:.4f}", flush=True)
    return EXIT_FAILURE if failed else EXIT_OK


def _reading(args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """Which checkpoint predict reads, and whether a run is still writing the directory."""
    from jtransfer import checkpoint

    which = {"best": "the best by test accuracy", "latest": "the latest"}.get(args.which, "")
    text = f"reading step {meta['step']} of {args.checkpoint}" + (f" ({which})" if which else "")
    holder = checkpoint.writer(args.checkpoint)
    if holder is not None:
        text += (
            f"; a run is still writing to it, {holder.describe()}: complete checkpoints only, "
            "newer ones may follow"
        )
    return text


def _export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from jtransfer import checkpoint
    from jtransfer.preprocess import Preprocessing

    model, variables, meta = checkpoint.load_for_inference(args.checkpoint, _which(args.which))
    import torch

    import porting

    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dict = porting.to_torchvision(variables, meta["arch"])
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state_dict, tmp)
    os.replace(tmp, out)
    classes = meta.get("classes")
    info = {
        "arch": meta["arch"],
        "num_classes": meta["num_classes"],
        "classes": classes,
        "image_size": meta.get("image_size"),
        "resize_size": meta.get("resize_size"),
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "preprocessing": Preprocessing.from_metadata(meta).to_dict(),
        "checkpoint": str(Path(args.checkpoint).expanduser().absolute() / str(meta["step"])),
    }
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out} (step {meta['step']} of {args.checkpoint}) and {sidecar}")
    if checkpoint.writer(args.checkpoint) is not None:
        print(f"note: {_reading(args, meta)}")
    if classes:
        print(f"classes (output index order): {', '.join(classes)}")
    print(
        f"load it: net = torchvision.models.{meta['arch']}(num_classes={meta['num_classes']}); "
        f"net.load_state_dict(torch.load({str(out)!r}, weights_only=True))"
    )
    return EXIT_OK
