"""Every use of a library's private internals, in one place, checked against the versions it was written for.

Exact resume and preemption need a few things Lightning and FFCV keep private: how many batches of the
epoch a restored run already trained on, the logger's step counter in a checkpoint, Lightning's SIGTERM
flag, and FFCV's traversal order, epoch counter and decoding primitives. A new version may move any of
them without notice; then these functions stop with a message naming what to re-check, instead of a run
that resumes in the wrong place.
"""

from __future__ import annotations

from importlib.metadata import version

__all__ = [
    "batches_done_this_epoch",
    "training_batches_per_epoch",
    "uncount_last_step",
    "clear_lightning_sigterm",
    "install_ffcv_order",
    "set_ffcv_epoch",
    "ffcv_decode_primitives",
    "reparse",
    "attached_trainer",
]

# The versions these accesses were read from and tested with (pyproject.toml pins the same ranges).
LIGHTNING_VERSIONS = ((2, 4), (2, 7))  # [low, high)
FFCV_VERSIONS = ("1.0.2",)


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def _check_lightning() -> None:
    found = version("lightning")
    low, high = LIGHTNING_VERSIONS
    if not low <= _release(found) < high:
        raise RuntimeError(
            f"compat.py relies on private internals of lightning {'.'.join(map(str, low))} to <{'.'.join(map(str, high))} "
            f"(batch progress, the logger's step counter, the SIGTERM flag), but lightning {found} is installed. Install "
            f"a version in that range (pyproject.toml), or check each function in compat.py against {found} and widen "
            f"LIGHTNING_VERSIONS."
        )


def _check_ffcv() -> None:
    found = version("ffcv")
    if found not in FFCV_VERSIONS:
        raise RuntimeError(
            f"compat.py relies on private internals of ffcv {', '.join(FFCV_VERSIONS)} (the loader's traversal order and "
            f"epoch counter, the JPEG decoding primitives), but ffcv {found} is installed. Install ffcv=={FFCV_VERSIONS[-1]}, "
            f"or check each ffcv function in compat.py against {found} and add it to FFCV_VERSIONS."
        )


_check_lightning()


# --- Lightning ---

def attached_trainer(module):
    """The Trainer ``module`` is attached to, None when it is not (``load_from_checkpoint`` calls its hooks without
    one); the public ``trainer`` property raises instead."""
    return module._trainer


def reparse(cli, args: list[str]) -> None:
    """Parse ``args`` with an existing LightningCLI's parser as its constructor would (parse, seed, then its
    ``before_instantiate_classes``), so that many command lines share one parser: building one costs twice a parse.
    Lightning 2.4-2.6 keep the seeding step private (``_set_seed``)."""
    cli.parse_arguments(cli.parser, args)
    cli._set_seed()
    cli.before_instantiate_classes()



def batches_done_this_epoch(trainer) -> int:
    """Training batches of the current epoch that a run restored mid-epoch already trained on (0 otherwise);
    Lightning restores this progress before the first batch is asked for."""
    loop = getattr(trainer, "fit_loop", None)
    return loop.epoch_loop.batch_progress.current.completed if loop is not None else 0


def training_batches_per_epoch(trainer) -> int:
    """Training batches per epoch (after ``limit_train_batches``), also before fit has loaded its data and when
    ``max_steps`` alone bounds the run (``estimated_stepping_batches`` then skips loading it)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    return trainer.num_training_batches


def uncount_last_step(checkpoint: dict) -> None:
    """For a checkpoint written at the start of a step: Lightning's restart adds one to the logger's step
    counter (``_batches_that_stepped``), assuming a checkpoint written at the end of a step, before it was
    counted; one written at the start of the next was written after."""
    checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def clear_lightning_sigterm(trainer) -> bool:
    """Take back a SIGTERM that Lightning's own handler recorded (it would stop the run at the next step
    without a checkpoint); returns whether there was one."""
    connector = trainer._signal_connector
    received, connector.received_sigterm = connector.received_sigterm, False
    return received


# --- FFCV ---


def install_ffcv_order(loader, order) -> None:
    """Make an FFCV loader read ``order.sample_order(epoch)``. FFCV 1.0.2 accepts custom orders in its
    signature but then fails on them (it tests ``isinstance`` where it means ``issubclass``), so the order
    goes in after construction; ``len(loader)`` reads the first epoch's order."""
    _check_ffcv()
    loader.traversal_order = order
    loader.first_traversal_order = order.sample_order(0)


def set_ffcv_epoch(loader, epoch: int) -> None:
    """FFCV's own epoch counter restarts at 0 in a new process: set it from the trainer's epoch."""
    _check_ffcv()
    loader.next_epoch = epoch


def ffcv_decode_primitives():
    """(imdecode, resize_crop, the metadata code of JPEG-stored images): what an FFCV image decoder calls."""
    _check_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop

    return imdecode, resize_crop, IMAGE_MODES["jpg"]
