"""The pipe's launcher (kvxfer/pipe/launcher.py), host path: a KV copy plan runs on its copy thread."""

from __future__ import annotations

import numpy as np

from kvxfer import KVCacheSpec, TransferState
from kvxfer.kernels import plan_kv_copy
from kvxfer.pipe.launcher import Launcher


def test_host_launch_copies_and_close_stops_the_thread():
    source_spec = KVCacheSpec(
        num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=4, dtype="float32", layout="HND"
    )
    target_spec = source_spec.replace(layout="NHD", block_size=2, num_blocks=8)
    source = np.random.default_rng(0).standard_normal(source_spec.tensor_shape).astype(np.float32)
    target = np.zeros(target_spec.tensor_shape, np.float32)
    plan = plan_kv_copy(source_spec, target_spec, [2, 0], [1, 5, 6, 3], num_tokens=8)
    launcher = Launcher(device=-1)
    step = launcher.launch(plan, (source.ctypes.data, source.nbytes), (target.ctypes.data, target.nbytes))
    step.block(5.0)
    assert step.poll() is TransferState.DONE
    # token t of the sequence: source block [2, 0][t // 4] slot t % 4 -> target block [1, 5, 6, 3][t // 2] slot t % 2
    for t in range(8):
        for head in range(2):
            got = target[:, [1, 5, 6, 3][t // 2], :, t % 2, head]  # NHD: [layer, block, part, token, head, dim]
            want = source[:, [2, 0][t // 4], :, head, t % 4]  # HND: [layer, block, part, head, token, dim]
            np.testing.assert_array_equal(got, want)
    launcher.close()
    assert launcher._executor is not None and launcher._executor._shutdown
