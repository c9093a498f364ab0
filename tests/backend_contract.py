"""The backend contract suite (see storage/backend.py). A backend binds it in three lines:

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path): return MyBackend(...)
"""
from __future__ import annotations

import pytest

from storage.errors import ObjectMissing


class BackendContract:
    def test_put_get_roundtrip(self, backend):
        backend.put("a/b/c", b"hello")
        assert backend.get("a/b/c") == b"hello"
        assert backend.exists("a/b/c")
        assert backend.size("a/b/c") == 5

    def test_put_parts_is_put_of_the_parts_joined(self, backend):
        import numpy as np
        rng = np.random.default_rng(7)
        # small pieces, and pieces of a pack's size: past the directory backend's direct-I/O
        # threshold, of lengths no multiple of 4096, from bytes, memoryviews and numpy arrays
        for sizes in ([1, 0, 5], [1, 3 << 20, 4095, 70000, 1]):
            parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
            given = [parts[0], memoryview(parts[1])] + [np.frombuffer(p, np.uint8) for p in parts[2:]]
            backend.put_parts("p/joined", given)
            assert backend.get("p/joined") == b"".join(parts)
            assert backend.size("p/joined") == sum(sizes)
            off = max(0, sizes[0] + sizes[1] - 2)  # across the first join
            assert backend.get_range("p/joined", off, 5) == b"".join(parts)[off:off + 5]

    def test_put_stream_is_put_of_the_parts_joined(self, backend):
        """A streamed put: pieces written over several calls (across the directory backend's
        chunk size, in lengths no multiple of 4096) make the object only at commit; an aborted
        stream leaves nothing, and a stream over an existing key replaces it whole."""
        import numpy as np
        rng = np.random.default_rng(8)
        for sizes in ([], [7], [1, (4 << 20) - 1, 2, 4095, (9 << 20) + 13, 1]):
            parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
            s = backend.put_stream("p/streamed")
            for i in range(0, len(parts), 2):
                s.write([parts[i], memoryview(parts[i + 1]) if i + 1 < len(parts) else b""])
                assert not backend.exists("p/streamed") or backend.get("p/streamed") == want
            s.commit()
            want = b"".join(parts)
            assert backend.get("p/streamed") == want and backend.size("p/streamed") == len(want)
        s = backend.put_stream("p/aborted")
        s.write([b"x" * (5 << 20)])
        s.abort()
        assert not backend.exists("p/aborted")
        assert list(backend.list("p/")) == ["p/streamed"]

    def test_put_replaces_whole_object(self, backend):
        backend.put("k", b"x" * 1000)
        backend.put("k", b"short")
        assert backend.get("k") == b"short"

    def test_get_range(self, backend):
        backend.put("r", bytes(range(256)))
        assert backend.get_range("r", 10, 5) == bytes([10, 11, 12, 13, 14])

    def test_get_range_past_end_is_missing(self, backend):
        backend.put("r", b"abc")
        with pytest.raises(ObjectMissing):
            backend.get_range("r", 1, 10)

    def test_missing(self, backend):
        assert not backend.exists("nope")
        with pytest.raises(ObjectMissing):
            backend.get("nope")
        with pytest.raises(ObjectMissing):
            backend.size("nope")

    def test_list_sorted_under_prefix(self, backend):
        for k in ("p/2", "p/1", "p/sub/3", "q/4"):
            backend.put(k, b"v")
        assert list(backend.list("p/")) == ["p/1", "p/2", "p/sub/3"]
        assert "q/4" in list(backend.list(""))

    def test_delete(self, backend):
        backend.put("d", b"v")
        backend.delete("d")
        backend.delete("d")  # a missing key is not an error
        assert not backend.exists("d")
        assert "d" not in list(backend.list(""))

    def test_hasty_view_is_the_same_store(self, backend):
        h = backend.hasty()
        backend.put("locks/x.json", b"lk")
        assert h.get("locks/x.json") == b"lk"
        h.delete("locks/x.json")
        h.delete("locks/x.json")
        assert not backend.exists("locks/x.json")
        assert backend.hasty() is h  # made once per backend

    def test_stat_all_sizes_and_times(self, backend):
        import time

        before = time.time()
        backend.put("s/a", b"12345")
        backend.put("s/b/c", b"")
        st = backend.stat_all("s/")
        assert sorted(st) == ["s/a", "s/b/c"]
        assert st["s/a"][0] == 5 and st["s/b/c"][0] == 0
        # object stores keep whole seconds; allow for that and a little clock skew
        assert before - 5 <= st["s/a"][1] <= time.time() + 5
