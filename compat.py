"""Every use of a library's private internals, in one place, checked against the versions it was written for.

Exact resume and preemption need a few things Lightning and FFCV keep private: how many batches of the
epoch a restored run already trained on, the logger's step counter in a checkpoint, Lightning's SIGTERM
flag, and FFCV's traversal order, epoch counter and decoding primitives; a failing data pipeline is told
from a slow one by FFCV's decoding thread, its queue and its compiled stages; and a pipeline is compiled once per
process through FFCV's compiler and memory managers' types. A new version may move any of
them without notice; then these functions stop with a message naming what to re-check, instead of a run
that resumes in the wrong place.
"""

from __future__ import annotations

import dis
import itertools
import sys
import time
from importlib.metadata import version
from queue import Full, Queue
from types import FrameType
from typing import Callable, Iterator, Optional

import numpy as np

__all__ = [
    "batches_done_this_epoch",
    "training_batches_per_epoch",
    "uncount_last_step",
    "clear_lightning_sigterm",
    "install_ffcv_order",
    "set_ffcv_epoch",
    "ffcv_decode_primitives",
    "ffcv_batches",
    "compile_ffcv_once",
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
            f"epoch counter, the JPEG decoding primitives, its decoding thread and compiled stages, its compiler and memory "
            f"managers' types), but ffcv {found} is "
            f"installed. Install ffcv=={FFCV_VERSIONS[-1]}, or check each ffcv function in compat.py against {found} and add "
            f"it to FFCV_VERSIONS."
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


def compile_ffcv_once() -> None:
    """Compile each of FFCV's pipeline functions once per process. FFCV 1.0.2 njit-compiles every operation of a
    pipeline afresh for every Loader, as each ``generate_code`` returns a new closure: on this 2-core machine 6.5 s
    for the seeded training pipeline and 1.2 s for the centre crop, paid by every pass that builds a loader, while
    its batches take milliseconds. Numba freezes a function's closure variables into its compiled code, so a
    function with the same code and equal closure values compiles to the same thing; that one is reused. A closure
    holding anything else (an object of unknown equality) compiles afresh, as before."""
    _check_ffcv()
    from ffcv.pipeline.compiler import Compiler

    compile_ = Compiler.__dict__["compile"].__func__
    if getattr(compile_, "once", False):
        return
    _leave_numba_types_alone()
    compiled = {}

    def compile_once(cls, code, signature=None):
        key = _compile_key(cls, code, signature)
        if key is None:
            return compile_(cls, code, signature)
        if key not in compiled:
            compiled[key] = compile_(cls, code, signature)
        return compiled[key]

    compile_once.once, compile_once.__wrapped__ = True, compile_
    Compiler.compile = classmethod(compile_once)


def _leave_numba_types_alone() -> None:
    """FFCV 1.0.2 makes its memory managers' array types read-only by setting ``mutable = False`` on numba's interned
    instances: ``nb.uint8[::1]`` is one object in the whole process. That changes its hash, and every numba table
    already keyed by it, such as the overloads of a compiled function that took a uint8 array, then fails with a
    KeyError (FFCV's own runs show it as "Exception ignored in: <finalize object>" warnings). A compiled function
    that a later loader reuses would fail at its next call. Here the read-only types are new instances."""
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager
    from ffcv.pipeline.compiler import Compiler

    def readonly(dtype, ndim: int = 1):
        return nb.types.Array(dtype, ndim, "C", readonly=True)

    def os_cache_reader(self):  # FFCV's, its result declared read-only as the data it slices is
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, readonly(nb.uint8)(nb.uint64, self.state_type))

    OSCacheManager.state_type = property(lambda self: nb.types.Tuple([readonly(nb.uint8), nb.uint64[::1], nb.uint64[::1]]))
    OSCacheManager.compile_reader = os_cache_reader
    ProcessCacheManager.state_type = property(lambda self: nb.types.Tuple(
        [readonly(nb.uint8, 2), readonly(nb.uint64), readonly(nb.uint64), readonly(nb.uint32)]))


class _Unkeyable(Exception):
    pass


def _compile_key(cls, code, signature) -> Optional[tuple]:
    """What fixes the machine code of ``Compiler.compile(code, signature)``: the function's code, defaults and closure
    values, the signature and whether it compiles in parallel; None when a closure value has no key."""
    if not cls.is_enabled or not hasattr(code, "__code__"):
        return None
    try:
        frozen = tuple(_value_key(cell.cell_contents) for cell in code.__closure__ or ())
        defaults = _value_key(code.__defaults__)
    except (_Unkeyable, ValueError):  # ValueError: an empty cell
        return None
    parallel = getattr(code, "is_parallel", False) and cls.num_threads > 1
    return code.__code__, frozen, defaults, str(signature), parallel


def _value_key(value):
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return type(value), value
    if isinstance(value, np.ndarray):
        return np.ndarray, value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, tuple):
        return tuple, tuple(_value_key(v) for v in value)
    if callable(value) and type(value).__eq__ is object.__eq__:
        return value  # functions, compiled functions, range and prange: the object itself (kept alive by the key)
    raise _Unkeyable


def ffcv_batches(loader, timeout: float, fail: Callable[[int, Optional[BaseException], Optional[tuple]], Exception]) -> Iterator:
    """One pass of an FFCV loader, each batch waited for at most ``timeout`` seconds. FFCV 1.0.2 decodes in a thread
    that dies silently when a pipeline stage raises, and its ``__next__`` then waits on an empty queue for ever: a
    run that neither fails nor progresses. Here a dead thread, or no batch within ``timeout``, raises
    ``fail(batch, exception, where)``: the index of the batch waited for in this pass, the thread's exception (None
    for a thread still busy), and ``(field, operation)`` of the pipeline stage it raised in or is stuck in (None
    when not known). The thread starts here, not at the first batch (``EpochAlignedLoader``'s inference mode)."""
    _check_ffcv()
    _record_ffcv_thread_failures()
    epoch = iter(loader)
    return _watched(loader, epoch, timeout, fail)


def _watched(loader, epoch, timeout: float, fail) -> Iterator:
    queue = epoch.output_queue
    try:
        for index in itertools.count():
            deadline = time.monotonic() + timeout
            while queue.empty():
                if not epoch.is_alive() and queue.empty():  # ended without its end-of-pass marker: it raised
                    failure = getattr(epoch, "failure", None)
                    raise fail(index, failure, _ffcv_stage(loader, _traceback_frames(failure))) from failure
                if time.monotonic() > deadline:
                    raise fail(index, None, _ffcv_stage(loader, _stack_frames(epoch.ident)))
                with queue.not_empty:  # woken by the next put; the timeout covers a put between the test and the wait
                    queue.not_empty.wait(0.1)
            batch = next(epoch, None)
            if batch is None:
                return
            yield batch
    finally:  # a pass left before its end (limit_*_batches, max_steps, an error): stop FFCV's thread, which would
        epoch.terminate_event.set()  # wait for ever to hand over its next batch or its end-of-pass marker
        queue.left = True


def _record_ffcv_thread_failures() -> None:
    """Keep the exception that ends an FFCV decoding thread on it (``failure``), for the consuming thread to raise;
    and let a thread whose pass was left stop (``_LeavableQueue``)."""
    from ffcv.loader import epoch_iterator
    from ffcv.loader.epoch_iterator import EpochIterator

    run = EpochIterator.run
    if getattr(run, "records_failure", False):
        return
    epoch_iterator.Queue = _LeavableQueue

    def run_recording_failure(self) -> None:
        try:
            run(self)
        except BaseException as err:
            self.failure = err

    run_recording_failure.records_failure = True
    EpochIterator.run = run_recording_failure


class _LeavableQueue(Queue):
    """FFCV's queue of decoded batches, whose ``put`` without a timeout gives up once the consumer has left the pass
    (``left``). FFCV's thread stops at a full queue when told to (``terminate_event``), but puts its end-of-pass
    marker with no timeout: a pass left within a queue's length of its end kept its thread waiting for ever."""

    left = False

    def put(self, item, block: bool = True, timeout: Optional[float] = None) -> None:
        if not block or timeout is not None:
            return super().put(item, block, timeout)
        while not self.left:
            try:
                return super().put(item, timeout=0.5)
            except Full:
                pass


def _traceback_frames(err: Optional[BaseException]) -> list[tuple[FrameType, int]]:
    frames, tb = [], err.__traceback__ if err is not None else None
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lasti))
        tb = tb.tb_next
    return frames  # outermost first


def _stack_frames(thread_id: Optional[int]) -> list[tuple[FrameType, int]]:
    frame, frames = sys._current_frames().get(thread_id), []
    while frame is not None:
        frames.append((frame, frame.f_lasti))
        frame = frame.f_back
    return frames[::-1]  # outermost first


def _ffcv_stage(loader, frames: list[tuple[FrameType, int]]) -> Optional[tuple[str, object]]:
    """(field, operation) whose call the innermost of FFCV's generated stage functions among ``frames`` was making.
    FFCV compiles a pipeline into stage functions ``stage_code_<s>`` that call each operation's code as the global
    ``code_<node id>``; the call in progress is the last such name loaded before the frame's current instruction."""
    if loader.code is None:
        return None
    stages = {code.__code__ for code, _ in loader.code[0]}
    for frame, offset in reversed(frames):
        if frame.f_code not in stages:
            continue
        called = [ins.argval for ins in dis.get_instructions(frame.f_code)
                  if ins.offset <= offset and ins.opname == "LOAD_GLOBAL" and str(ins.argval).startswith("code_")]
        if not called:
            return None
        node = loader.graph.id_to_node[int(called[-1].removeprefix("code_"))]
        operation = getattr(node, "operation", None) or getattr(node, "decoder", None)
        while not hasattr(node, "field_name") and getattr(node, "parent", None) is not None:
            node = node.parent  # a transform's field is its decoder's
        return getattr(node, "field_name", "?"), operation
    return None
