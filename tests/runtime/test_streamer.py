import numpy as np

from offspec.runtime.streamer import LayerStreamer


def _files(tmp_path, n=4, size=8192):
    files, sizes = {}, {}
    for i in range(n):
        p = tmp_path / f"layer_{i}.bin"
        p.write_bytes(bytes([i + 1]) * (size + i * 4096))
        files[i], sizes[i] = p, size + i * 4096
    return files, sizes


def test_streams_layers_in_order_and_wraps_around_passes(tmp_path):
    files, sizes = _files(tmp_path)
    s = LayerStreamer(files, sizes, [0, 2, 3], slots=2)
    try:
        for _ in range(3):  # three passes: prefetch continues across pass boundaries
            for layer in (0, 2, 3):
                slot, buf = s.acquire(layer)
                data = buf[: sizes[layer]].numpy()
                assert np.all(data == layer + 1)
                s.release(slot)
        assert s.stats.bytes_read >= 3 * sum(sizes[i] for i in (0, 2, 3))
    finally:
        s.close()


def test_an_aborted_pass_resyncs_on_the_next_pass(tmp_path):
    files, sizes = _files(tmp_path)
    s = LayerStreamer(files, sizes, [0, 1, 2, 3], slots=2)
    try:
        slot, _ = s.acquire(0)
        s.release(slot)  # pass aborted after layer 0
        for layer in range(4):
            slot, buf = s.acquire(layer)
            assert int(buf[0]) == layer + 1
            s.release(slot)
    finally:
        s.close()
