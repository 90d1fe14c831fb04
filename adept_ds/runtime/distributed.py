"""Process-group setup and teardown: with the training engine, universal.py and the probe's ZeRO-3 runtime
(probe/runtime.py), the only modules that touch torch.distributed."""

from __future__ import annotations

import gc
import math
import os

import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    """True under a launcher (deepspeed, torchrun, mpirun, mpiexec) that started several ranks."""
    discover_ranks()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def import_deepspeed():
    """`import deepspeed`, less the `import mlflow` its autotuner makes at import time when mlflow is installed:
    2 s of every rank's start on CPU (-X importtime), for an autotuner adept_ds never runs. mlflow stays
    importable: only deepspeed's own first import sees it missing (our report sink imports it when asked)."""
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    blocked = "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; deepspeed catches it
    try:
        import deepspeed
    finally:
        if blocked:
            del sys.modules["mlflow"]
    return deepspeed


DEFAULT_TIMEOUT_MINUTES = 30.0
"""The process-group timeout unless the run config sets `train.timeout_minutes` (DeepSpeed's own default is 10)."""


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, threads: int = 0) -> tuple[int, int]:
    """Start (or join) the process group DeepSpeed's launcher, torchrun or a single process set up.

    Returns (rank, world_size). gloo on CPU, nccl on GPU. Each rank takes `threads` intra-op threads, or
    its share of this node's cores (`threads_per_rank`).
    """
    from datetime import timedelta

    deepspeed = import_deepspeed()  # a rank's first deepspeed import
    discover_ranks()
    cpu = on_cpu()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _without_shm_all_reduce()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` run: be a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False, timeout=timedelta(minutes=timeout_minutes))
    torch.set_num_threads(threads_per_rank(threads))
    if not cpu:
        torch.cuda.set_device(device_index())
    return dist.get_rank(), dist.get_world_size()


def device_index() -> int:
    """This rank's GPU among those it sees: LOCAL_RANK modulo the visible count. Every GPU of the node is visible
    under DeepSpeed's launcher and torchrun (rank i takes GPU i); under per-task binding (`srun --gpus-per-task=1`,
    a per-rank CUDA_VISIBLE_DEVICES) each rank sees only its own, as device 0."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def threads_per_rank(requested: int = 0) -> int:
    """`requested` when set, else OMP_NUM_THREADS when the user or launcher set it (torchrun sets 1, DeepSpeed's
    --bind_cores_to_rank its cores per rank), else the cores this process may run on (its affinity: a Slurm
    or container CPU set, not the whole machine) shared between this node's ranks. torch's own default is every
    core in every rank: 2 ranks x 2 threads on 2 cores run measurably slower than 2 x 1 (issue 16)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, usable_cpus() // max(1, local_world_size()))


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (a Slurm step's or a container's CPU set), not the
    machine's count that os.cpu_count() gives."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def local_world_size(default: int = 1) -> int:
    """This node's ranks as the launcher said (discover_ranks sets LOCAL_WORLD_SIZE for every launcher, DeepSpeed's
    own sets LOCAL_SIZE); `default` where neither is set."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", default)))


def agreed_minimum(value: int) -> int:
    """The smallest `value` of any rank (e.g. device memory, so that every rank plans for the tightest)."""
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


class AllGatherCounter:
    """Counts the bytes DeepSpeed all-gathers (the gathered tensors' size) while active, without blocking anything.

    ZeRO-3 gathers parameters through `deepspeed.comm` (`allgather_fn` -> `all_gather_into_tensor`, or `all_gather`
    where that is missing), looked up at each call: wrapping both sees every parameter gather, coalesced or not,
    quantized or hierarchical (hpZ). DeepSpeed's comms logger counts the same calls but synchronizes after each,
    which would distort the step times measured beside.
    """

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.bytes_in_subgroups = 0
        """Of `bytes`, those gathered within a group smaller than the world (hpZ's node-local gathers)."""

    def __enter__(self):
        import deepspeed.comm
        import deepspeed.comm.comm

        # Both namespaces: ZeRO-3 calls `deepspeed.comm.<op>`, and `allgather_fn` calls its own module's globals.
        self._namespaces = (deepspeed.comm, deepspeed.comm.comm)
        self._originals = {name: getattr(deepspeed.comm.comm, name) for name in ("all_gather_into_tensor", "all_gather")}

        def counting(name, outputs):
            original = self._originals[name]

            def counted(*args, **kwargs):
                output = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
                gathered = sum(t.numel() * t.element_size() for t in outputs(output))
                group = args[2] if len(args) > 2 else kwargs.get("group")
                self.bytes += gathered
                self.calls += 1
                if group is not None and deepspeed.comm.get_world_size(group) < deepspeed.comm.get_world_size():
                    self.bytes_in_subgroups += gathered
                return original(*args, **kwargs)

            return counted

        wrapped = {
            "all_gather_into_tensor": counting("all_gather_into_tensor", lambda output: [output]),
            "all_gather": counting("all_gather", list),
        }
        for namespace in self._namespaces:
            for name, function in wrapped.items():
                setattr(namespace, name, function)
        return self

    def __exit__(self, *_):
        for namespace in self._namespaces:
            for name, original in self._originals.items():
                setattr(namespace, name, original)


# Where mpirun/mpiexec put (rank, world size, local rank, local world size). The DeepSpeed launcher and
# torchrun set RANK/WORLD_SIZE/LOCAL_RANK themselves.
_MPI_RANK_VARS = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH, Intel MPI, MVAPICH (Hydra)
]
# Signs that an MPI launcher started us under names we do not read (PMIx, MVAPICH's mpirun_rsh): ask mpi4py.
_MPI_MARKERS = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "MV2_COMM_WORLD_")


def discover_ranks() -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for any launcher.

    The DeepSpeed launcher (local, hostfile or no-ssh multi-node) and torchrun already set the ranks;
    mpirun/mpiexec set them under their own names, read here, with mpi4py as the fallback for MPIs
    whose names we do not know. The master address and port come from the environment when given
    (`mpirun -x MASTER_ADDR=... -x MASTER_PORT=...`); otherwise rank 0 broadcasts them over MPI
    (127.0.0.1 when every rank is on its node, else its host name; a port it found free). Setting all
    of them also stops DeepSpeed's own MPI discovery, which takes the first address of `hostname -I`
    (often the wrong interface) and always port 29500. A plain `python` run is left alone.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        names = next((names for names in _MPI_RANK_VARS if all(name in env for name in names[:3])), None)
        if names is not None:
            rank, size, local_rank, local_size = names
            env.update(RANK=env[rank], WORLD_SIZE=env[size], LOCAL_RANK=env[local_rank])
            if local_size in env:
                env["LOCAL_WORLD_SIZE"] = env[local_size]
        elif any(key.startswith(_MPI_MARKERS) for key in env):
            _ranks_from_mpi4py()
        else:
            return
    if "LOCAL_RANK" not in env:
        raise RuntimeError(f"rank {env['RANK']} of {env['WORLD_SIZE']}: the launcher set no LOCAL_RANK; set it")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))  # DeepSpeed's launcher: LOCAL_SIZE
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        addr, port = _master_from_rank_zero()
        env.setdefault("MASTER_ADDR", addr)
        env.setdefault("MASTER_PORT", str(port))


def launched_world_size() -> int:
    discover_ranks()  # mpirun sets only its own names (OMPI_COMM_WORLD_SIZE, PMI_SIZE): read them first
    return int(os.environ.get("WORLD_SIZE", "1"))


def _mpi_world():
    try:
        from mpi4py import MPI
    except ImportError as err:  # the mpi4py wheel holds no MPI: it needs one installed (openmpi-bin, mpich)
        raise RuntimeError(
            f"an MPI launcher started this process but mpi4py cannot load ({err}); "
            "set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or install an MPI"
        ) from err
    return MPI, MPI.COMM_WORLD


def _ranks_from_mpi4py() -> None:
    MPI, world = _mpi_world()
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this node's memory
    os.environ.update(
        RANK=str(world.Get_rank()),
        WORLD_SIZE=str(world.Get_size()),
        LOCAL_RANK=str(node.Get_rank()),
        LOCAL_WORLD_SIZE=str(node.Get_size()),
    )
    node.Free()


def _master_from_rank_zero() -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT where the environment has them, else rank 0's choice broadcast over MPI."""
    import socket

    env = os.environ
    if env["WORLD_SIZE"] == "1":
        return env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or free_port())
    _, world = _mpi_world()
    chosen = None
    if world.Get_rank() == 0:
        # Other nodes resolve rank 0's host name themselves; the rendezvous listens on every interface.
        one_node = env["LOCAL_WORLD_SIZE"] == env["WORLD_SIZE"]
        chosen = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else socket.gethostname()), int(env.get("MASTER_PORT") or free_port())
    return world.bcast(chosen, root=0)


def _without_shm_all_reduce() -> None:
    """Keep DeepSpeed on plain gloo on CPU: no shared-memory all-reduce op.

    DeepSpeed 0.19 JIT-compiles that op on first use (1-10+ min on 2 cores, under a file lock that a
    killed build leaves behind and every later run then waits on forever) and never unlinks its
    /dev/shm buffers (69 MB per rank per run, held in RAM until reboot). Its op table is a cached
    dict that DeepSpeed documents edits to as persisting, which is how we switch the op off.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    """Tear the process group down cleanly.

    Callers drop their engine/model/optimizer references first. Without collecting them before the
    barrier, a gloo worker thread can free a tensor during interpreter shutdown and abort the process.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous (never a fixed default two jobs would share)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned (gloo and nccl both reduce float64 on the tensor's own device)."""
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
    reduced = tensor.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def all_gather_objects(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def decided_by_rank_zero(decide):
    """`decide()` run on rank 0 only, its answer (or the ValueError it raised) broadcast and returned on every rank.

    For filesystem questions (which checkpoint to resume, whether a step is saved): on NFS or Lustre the
    ranks' views can differ for a moment, and ranks that answered alone could take different collective
    paths and hang. Also a barrier: rank 0 has finished `decide()` when any rank returns.
    """
    answer = [None, None]
    if dist.get_rank() == 0:
        try:
            answer = [decide(), None]
        except ValueError as err:
            answer = [None, str(err)]
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise ValueError(answer[1])
    return answer[0]


def local_share(param, stage: int, grad: bool = False) -> torch.Tensor | None:
    """This rank's share (fp32) of a parameter, or of its gradient when `grad`, read without communication.

    ZeRO-3: the rank's own partition. ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fragment of the
    flattened parameter whose fp32 master copy this rank holds (`_hp_mapping`), and the same elements of
    the gradient, so theta and |g| line up and every element is counted by exactly one rank. Gradients are
    readable after `engine.backward` at an accumulation boundary, before `engine.step`.
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    if stage == 3:
        return safe_get_local_grad(param) if grad else safe_get_local_fp32_param(param)
    if not hasattr(param, "_hp_mapping"):  # no ZeRO optimizer (stage 0, fp32): whole tensors on every rank
        whole = (param.grad if grad else param.detach()).flatten()
        chunk = math.ceil(whole.numel() / dist.get_world_size())
        return whole[dist.get_rank() * chunk : (dist.get_rank() + 1) * chunk]
    mapping = param._hp_mapping
    if mapping is None:  # none of this parameter lies in this rank's partition
        return torch.empty(0)
    if not grad:
        return mapping.hp_fragment
    # As DeepSpeed's get_full_hp_grad reads it, without its all-reduce: ZeRO-1/2 keep this rank's
    # fragment of the reduced gradient; the bf16 optimizer keeps a whole fp32 gradient on every rank
    # (its param.grad is a bf16 staging copy), and a set param.grad is whole too: both are narrowed.
    if getattr(param, "_hp_grad", None) is None and param.grad is not None:
        whole_or_fragment = param.grad
    else:
        whole_or_fragment = mapping.get_lp_grad_fragment(param._index_in_param_group)
    flat = whole_or_fragment.flatten()
    if flat.numel() == param.numel():
        address = mapping.lp_fragment_address
        flat = flat.narrow(0, address.start, address.numel)
    return flat.float()


def zero3_engine(model_dir, dtype: torch.dtype, config: dict, make_optimizer=None):
    """A DeepSpeed ZeRO-3 engine over the HF model in `model_dir`, which every rank loads straight into
    its own partition of every weight: no rank ever holds the whole model, so one larger than a device fits.

    `config` is the DeepSpeed config less ZeRO-3 and precision, which follow `dtype`;
    `make_optimizer(model)`, when given, runs between loading and `deepspeed.initialize` and returns
    the optimizer (or None). Keep the engine: its hooks gather each layer's weights in every forward,
    collectively, so all ranks must run the same sequence of forwards.
    """
    deepspeed = import_deepspeed()
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    config = {
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},  # zero.Init partitions in the config's precision
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
        **config,
    }
    hf_ds_config = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    optimizer = make_optimizer(model) if make_optimizer else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.module.eval()
    del hf_ds_config
    return engine
