"""ID embedding tables sharded across ranks by TorchRec (``train.embeddings: torchrec``).

Under DDP and FSDP every rank holds (or all-gathers) the whole ID tables; a 1M-user x 64 table and
its AdamW state are then ~0.8 GB on every rank. With ``embeddings: torchrec`` the trainer calls
``shard_model`` instead of ``distributed.wrap_model``:

1. **Swap.** Each ID table of the model (``ID_TABLES``: the two-tower's item and user tables, the
   ranker's ``user_id`` / ``item_id``) is replaced, from outside, by a ``TorchRecEmbedding``: a
   one-table ``EmbeddingBagCollection`` behind ``nn.Embedding``'s call interface (ids of any shape
   -> ``[..., dim]``), so the towers keep one code path for both backends. The ids go in as a
   ``KeyedJaggedTensor`` with one bag per position: a padding id becomes an empty bag (an exact
   zero vector and no gradient, as ``padding_idx`` gives).
2. **Plan.** ``EmbeddingShardingPlanner`` places the tables on the ranks (``collective_plan``:
   rank 0 plans, everyone gets its plan), limited to the sharding kinds the device allows. On
   CPU/gloo TorchRec offers ``table_wise``, ``column_wise`` and ``table_column_wise``; ``row_wise``
   (rows split by ID, the usual way to spread one huge user table) needs CUDA/NCCL. The plan is
   logged at start and written as ``sharding_plan.json`` beside the checkpoints.
3. **Wrap.** ``DistributedModelParallel`` shards the tables and wraps the rest of the model in DDP.
   Each rank starts from rank 0's weights (tables broadcast, then copied into the local shards).

Why the tables use TorchRec's ``dense`` kernel, not its default ``fused`` one: the fused kernel
applies its own optimizer inside the backward, only to the rows a batch touched (a "lazy" Adam),
before any gradient clipping. That is a different optimiser from the trainer's AdamW (which decays
and moves every row with momentum every step, after clipping), so a sharded run would not train the
model a plain run trains. With the dense kernel the local shards are ordinary autograd parameters
and the trainer's AdamW updates them; TorchRec averages their gradients over ranks exactly as DDP
averages the dense ones. The planner picks shards with the fused kernel (1.8's planner only lets
``dense`` pair with data-parallel) and the plan's kernel is then set to ``dense``; the sharded
modules run it (tested on CPU/gloo for table- and column-wise). Costs of that choice: the whole
shard's AdamW state is touched every step (as in a plain run), and there is no fused row-wise
Adagrad; the gain is that sharding does not change the math (``tests/train/test_sharding.py``).

Gradient clipping needs the global norm: replicated parameters are counted once, the table shards'
squared norms are summed over ranks (``clip_grad_norm_``).

Checkpoints (``save`` / ``load``) go through ``torch.distributed.checkpoint``: every rank writes its
own shards of the tables and their AdamW moments (as ``ShardedTensor``s keyed like the plain model:
``item_tower.id_embedding.weight``), so nothing is gathered on one rank, and DCP reshards on load:
a run can resume on a different world size or plan. ``load_full_model_state`` reads such a
checkpoint into the plain model's full ``state_dict`` in one process (evaluation, bundles).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from feedrank.train.distributed import DistEnv

log = logging.getLogger(__name__)

EmbeddingsBackend = Literal["torch", "torchrec"]
ShardingKind = Literal["auto", "table_wise", "column_wise", "table_column_wise", "row_wise"]

#: The kinds TorchRec's planner offers per device type (data_parallel left out: it replicates).
ALLOWED_KINDS: dict[str, tuple[str, ...]] = {
    "cpu": ("table_wise", "column_wise", "table_column_wise"),
    "cuda": ("table_wise", "column_wise", "table_column_wise", "row_wise"),
}

#: The ID tables of each model, by class name: the large ``nn.Embedding``s worth sharding. The
#: categorical and position tables are small and stay replicated (DDP).
ID_TABLES: dict[str, tuple[str, ...]] = {
    "TwoTower": ("item_tower.id_embedding", "user_tower.id_embedding"),
    "Ranker": ("user_id", "item_id"),
}

PLAN_FILE = "sharding_plan.json"
_ROWS_KEY = "weight"


def table_name(path: str) -> str:
    """The TorchRec table (and feature) name of the table at module path ``path``.

    ``item_tower.id_embedding`` -> ``item_tower__id_embedding``: unique per model, and never one of
    the ``ModuleDict`` method names (``items``, ``keys``, ``values``) TorchRec refuses as a table name.
    """
    return path.replace(".", "__")


class TorchRecEmbedding(nn.Module):
    """``nn.Embedding``'s call interface over a one-table TorchRec ``EmbeddingBagCollection``.

    Built on the meta device (``DistributedModelParallel`` allocates only this rank's shard). Its
    ``state_dict`` uses ``nn.Embedding``'s key (``weight``), so a sharded checkpoint and a plain
    model share their keys.
    """

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, padding_idx: int | None):
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        self.name, self.padding_idx = name, padding_idx
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        config = EmbeddingBagConfig(name=name, embedding_dim=embedding_dim, num_embeddings=num_embeddings,
                                    feature_names=[name], pooling=PoolingType.SUM)
        self.collection = EmbeddingBagCollection(tables=[config], device=torch.device("meta"))
        self._inner_key = f"collection.embedding_bags.{name}.weight"
        self._register_state_dict_hook(_rename_weight)

    def forward(self, ids: Tensor) -> Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1)
        if self.padding_idx is None:
            values, lengths = flat, torch.ones_like(flat, dtype=torch.int32)
        else:
            real = flat != self.padding_idx
            values, lengths = flat[real], real.to(torch.int32)
        kjt = KeyedJaggedTensor(keys=[self.name], values=values, lengths=lengths)
        return self.collection(kjt)[self.name].reshape(*ids.shape, self.embedding_dim)


def _rename_weight(module: TorchRecEmbedding, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    state_dict[prefix + _ROWS_KEY] = state_dict.pop(prefix + module._inner_key)


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def swap_id_tables(model: nn.Module) -> dict[str, Tensor]:
    """Replace the model's ID tables (``ID_TABLES``) by ``TorchRecEmbedding``s, in place.

    Returns each replaced table's weight by path (the initial values for the shards). A model class
    with no entry, or with none of its tables present, is refused: there would be nothing to shard.
    """
    paths = ID_TABLES.get(type(model).__name__)
    if paths is None:
        raise ValueError(f"embeddings: torchrec knows the ID tables of {sorted(ID_TABLES)}, "
                         f"not of {type(model).__name__}")
    weights: dict[str, Tensor] = {}
    for path in paths:
        table = _get(model, path)
        if table is None:  # e.g. user_id_dim: 0
            continue
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"{path} is a {type(table).__name__}, expected nn.Embedding")
        parent_path, _, attr = path.rpartition(".")
        parent = _get(model, parent_path) if parent_path else model
        setattr(parent, attr, TorchRecEmbedding(table_name(path), table.num_embeddings, table.embedding_dim,
                                                table.padding_idx))
        weights[path] = table.weight.detach()
    if not weights:
        raise ValueError(f"{type(model).__name__} has none of its ID tables {paths}: nothing to shard")
    return weights


@dataclass
class ShardedEmbeddings:
    """A model whose ID tables TorchRec shards: the module to train and what the trainer needs."""

    module: nn.Module  # the DistributedModelParallel to call in training
    model: nn.Module  # the model itself, tables sharded in place
    env: DistEnv
    table_params: list[nn.Parameter]  # this rank's table shards (may be empty on a rank)

    # ------------------------------------------------------------------ gradient norm

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        """The global gradient norm of ``params`` (all ranks together); clip to ``max_norm`` if set.

        Replicated parameters have the same (averaged) gradient on every rank and count once; the
        table shards are disjoint and their squared norms are summed over ranks.
        """
        shard_ids = {id(p) for p in self.table_params}
        with_grad = [p for p in params if p.grad is not None]
        zero = torch.zeros((), device=self.env.device)

        def squared(group: list[nn.Parameter]) -> Tensor:
            return torch.nn.utils.get_total_norm([p.grad for p in group]) ** 2 if group else zero.clone()

        sq_replicated = squared([p for p in with_grad if id(p) not in shard_ids])
        sq_shards = squared([p for p in with_grad if id(p) in shard_ids])
        if self.env.is_distributed:
            dist.all_reduce(sq_shards)
        norm = (sq_replicated + sq_shards).sqrt()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
        return norm

    # ------------------------------------------------------------------ checkpoints

    def _state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and AdamW state as DCP expects it, keyed like the plain model.

        A table's weight is TorchRec's ``ShardedTensor``; its AdamW moments are ``ShardedTensor``s
        with the same global layout over this rank's moment tensors, so DCP can reshard them too.
        Missing optimizer state is created (zeros, step 0, as AdamW's first step would), so the same
        call gives ``load`` the tensors to load into.
        """
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

        shard_ids = {id(p) for p in self.table_params}
        for p in (p for group in optimizer.param_groups for p in group["params"] if p.numel()):
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        model_sd = self.model.state_dict()
        named = list(self.model.named_parameters())
        # This rank's shard of a table is the parameter named ...embedding_bags.<table>.weight.
        local_param = {name.rsplit(".", 2)[-2]: p for name, p in named if id(p) in shard_ids}
        optim: dict[str, Any] = {name: optimizer.state[p] for name, p in named
                                 if id(p) not in shard_ids and p.numel() and optimizer.state.get(p)}
        for key, weight in model_sd.items():
            if not isinstance(weight, ShardedTensor):
                continue
            local = weight.local_shards()
            if len(local) > 1:
                raise NotImplementedError(f"{key}: {len(local)} shards of one table on rank {self.env.rank}")
            param = local_param.get(table_name(key.removesuffix("." + _ROWS_KEY))) if local else None
            entry: dict[str, Any] = {} if param is None else {"step": optimizer.state[param]["step"]}
            for moment in ("exp_avg", "exp_avg_sq"):
                pieces = [] if param is None else [Shard(optimizer.state[param][moment], local[0].metadata)]
                entry[moment] = ShardedTensor._init_from_local_shards_and_global_metadata(
                    pieces, weight.metadata(), process_group=dist.group.WORLD)
            optim[key] = entry
        return {"model": model_sd, "optim": optim}

    def save(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write this rank's part of the model and optimizer state to ``directory`` (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizer), checkpoint_id=str(directory))

    def load(self, directory: Path, optimizer: torch.optim.Optimizer) -> None:
        """Load a checkpoint ``save`` wrote, on any world size and plan (DCP reshards)."""
        import torch.distributed.checkpoint as dcp

        # In place: state_dict() tensors share storage with the parameters (and the table entries'
        # local shards are views of this rank's shard), so loading into them loads the model.
        dcp.load(self._state(optimizer), checkpoint_id=str(directory))


def load_full_model_state(directory: Path) -> dict[str, Tensor]:
    """The plain model's full ``state_dict`` from a sharded checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    meta = reader.read_metadata()
    state = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


def _kinds_for(device: torch.device, kind: ShardingKind) -> list[str]:
    allowed = ALLOWED_KINDS.get(device.type)
    if allowed is None:
        raise ValueError(f"embeddings: torchrec on device {device.type!r} is not supported (cpu or cuda)")
    if kind == "auto":
        return list(allowed)
    if kind not in allowed:
        raise ValueError(f"embedding_sharding {kind!r} needs CUDA devices (NCCL); on {device.type} TorchRec "
                         f"offers {', '.join(allowed)}")
    return [kind]


def _column_block(dim: int, world_size: int, kind: ShardingKind) -> int | None:
    """Columns per shard for ``column_wise``: one block per rank (TorchRec wants blocks divisible by 4).

    Left to the planner otherwise; its default block (128 columns) would keep a 64-dim table whole.
    """
    if kind != "column_wise" or dim % world_size or (dim // world_size) % 4:
        return None
    return dim // world_size


def _plan_dict(plan: Any) -> dict[str, Any]:
    """TorchRec's ``ShardingPlan`` as plain JSON: per table, its kind and where each shard lives."""
    out: dict[str, Any] = {}
    for module_path, tables in plan.plan.items():
        for name, ps in tables.items():
            shards = [] if ps.sharding_spec is None else [
                {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
                for s in ps.sharding_spec.shards]
            out[f"{module_path}.{name}"] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                                            "ranks": ps.ranks, "shards": shards}
    return out


def shard_model(model: nn.Module, env: DistEnv, kind: ShardingKind, plan_dir: Path,
                bucket_cap_mb: float = 25.0) -> ShardedEmbeddings:
    """Swap, plan, wrap (see the module docstring). Every rank calls it; rank 0 writes the plan."""
    if not dist.is_initialized():
        raise RuntimeError("embeddings: torchrec runs under torchrun (also for one process: "
                           "torchrun --nproc_per_node 1)")
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    kinds = _kinds_for(env.device, kind)
    weights = swap_id_tables(model)
    with torch.no_grad():
        for w in weights.values():
            dist.broadcast(w, src=0)  # every rank starts from rank 0's tables, as DDP does for the rest
    constraints = {table_name(path): ParameterConstraints(sharding_types=kinds, compute_kernels=["fused"],
                                                          min_partition=_column_block(w.shape[1], env.world_size, kind))
                   for path, w in weights.items()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=env.world_size, compute_device=env.device.type),
                                       constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    for tables in plan.plan.values():
        for ps in tables.values():
            ps.compute_kernel = "dense"  # see the module docstring: the trainer's AdamW updates the shards
    # DMP's default DDP uses static_graph=True, which gave wrong dense gradients here (two lookups of
    # one table per forward, tested against one process): plain DDP, as distributed.wrap_model uses.
    dense_wrapper = DefaultDataParallelWrapper(bucket_cap_mb=max(1, round(bucket_cap_mb)), static_graph=False)
    dmp = DistributedModelParallel(model, device=env.device, plan=plan, sharders=sharders,
                                   data_parallel_wrapper=dense_wrapper)

    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, value in model.state_dict().items():
            if isinstance(value, ShardedTensor):
                full = weights[key.removesuffix("." + _ROWS_KEY)]
                for shard in value.local_shards():
                    (r, c), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[r:r + nr, c:c + nc])
    table_params = [p for m in model.modules() if isinstance(m, TorchRecEmbedding)
                    for p in m.collection.parameters() if p.numel()]
    summary = _plan_dict(plan)
    if env.is_main:
        log.info("TorchRec sharding plan (%d ranks):\n%s", env.world_size, plan)
        print(f"TorchRec sharding plan ({env.world_size} ranks):\n{plan}", flush=True)
        plan_dir.mkdir(parents=True, exist_ok=True)
        (plan_dir / PLAN_FILE).write_text(json.dumps({"world_size": env.world_size, "tables": summary}, indent=2))
    return ShardedEmbeddings(module=dmp, model=model, env=env, table_params=table_params)
