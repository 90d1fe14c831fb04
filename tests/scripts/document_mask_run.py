"""One training step with data.document_mask on (launch/train.py's code path: importance, validation and the step all
pass position ids), then, on every rank, blocks of the domain store scored through the ZeRO-3 engine twice: packed, as
training scores them, and each document on its own. Every rank makes the same forwards (ZeRO-3 gathers collectively).

argv: out_dir key=value overrides...
"""

import json
import sys
from pathlib import Path

import torch

from adept_ds.data.blocks import store_batch
from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run

out_dir, *overrides = sys.argv[1:]
trainer = Trainer(resolve_run(load_run_config(None, overrides), show_progress=False), show_progress=False)
losses = trainer.train()
trainer.engine.eval()
blocks = []
store = trainer.domain[0]
packed_blocks = [index for index in range(len(store)) if (store.positions(index)[1:] == 0).any()][:2]  # 2+ documents each
with torch.no_grad():
    for index in packed_blocks:
        batch = store_batch(store, [index], trainer.packing)
        packed = trainer.forward_loss(batch).item()
        positions, ids = batch.position_ids[0], batch.input_ids[0]
        starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(ids)]
        alone, count = 0.0, 0
        for start, end in zip(starts, starts[1:]):
            if end - start > 1:  # a one-token piece (a document's first token at the block's end) predicts nothing
                piece = ids[start:end][None]
                alone += trainer.engine(input_ids=piece, labels=piece).loss.double().item() * (end - start - 1)
                count += end - start - 1
        blocks.append({"packed": packed, "alone": alone / count, "predicted": count, "documents": len(starts) - 1})
record = {"rank": trainer.rank, "losses": losses, "blocks": blocks, "validations": trainer.state.validation}
(Path(out_dir) / f"rank{trainer.rank}.json").write_text(json.dumps(record))
trainer.close()
