import kvxfer

# The names DESIGN.md §3 documents (plus the types they mention). Changing this list is an API change.
DOCUMENTED = {
    "Agent",
    "BackendError",
    "BackendUnavailableError",
    "ConfigError",
    "Descs",
    "DescriptorError",
    "HandshakeError",
    "KVCacheSpec",
    "KVLayout",
    "KvxferError",
    "LayoutMismatchError",
    "MemoryKind",
    "Notification",
    "Peer",
    "PeerDisconnectedError",
    "PeerError",
    "Region",
    "RegistrationError",
    "RemoteRegion",
    "Timeouts",
    "TransferCancelledError",
    "TransferError",
    "TransferHandle",
    "TransferPlan",
    "TransferState",
    "TransferTimeoutError",
    "UsageError",
    "KVPipe",
    "__version__",
    "Handle",
    "PipeHandle",  # every handle kvxfer returns, and the protocol they share
    "Limits",  # Agent(limits=...): bounds on what peers may make an agent hold
    "EngineTimeoutError",
    "LeaseLostError",
    "OutOfBlocksError",
    "UcxStatusError",  # every exception, errors.py
    "AdmissionRejectedError",
    "QueueFullError",
    "RequeueLimitError",  # the serving layer's, errors.py too
}


def test_all_matches_documented_names():
    assert set(kvxfer.__all__) == DOCUMENTED
    assert kvxfer.__all__ == sorted(kvxfer.__all__, key=lambda n: (n.startswith("_"), n))
    for name in kvxfer.__all__:
        assert getattr(kvxfer, name) is not None


def test_error_tree():
    assert issubclass(kvxfer.ConfigError, ValueError)
    assert issubclass(kvxfer.LayoutMismatchError, kvxfer.ConfigError)
    assert issubclass(kvxfer.DescriptorError, ValueError)
    assert issubclass(kvxfer.TransferTimeoutError, TimeoutError)
    assert issubclass(kvxfer.HandshakeError, kvxfer.PeerError)
    assert issubclass(kvxfer.BackendError, kvxfer.TransferError)
    assert issubclass(kvxfer.UsageError, RuntimeError)
    for name in kvxfer.__all__:
        obj = getattr(kvxfer, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, kvxfer.KvxferError)


def test_import_needs_only_numpy_and_msgpack():
    import subprocess
    import sys

    code = (
        "import sys, kvxfer; heavy = {'torch', 'cupy', 'cffi', 'fastapi', 'cuda'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_every_handle_shares_the_handle_protocol():
    for handle_type in (kvxfer.TransferHandle, kvxfer.PipeHandle):
        assert issubclass(handle_type, kvxfer.Handle)
        for name in ("poll", "wait", "cancel", "release", "block", "result", "__enter__", "__exit__"):
            assert callable(getattr(handle_type, name))


def test_every_exception_lives_in_errors_and_is_exported():
    import ast
    from pathlib import Path

    import kvxfer.errors

    assert set(kvxfer.errors.__all__) <= set(kvxfer.__all__)
    for name in kvxfer.errors.__all__:
        assert getattr(kvxfer, name) is getattr(kvxfer.errors, name)
    # no other module derives an exception of its own from the tree (a module may import one and raise it)
    tree_names = set(kvxfer.errors.__all__)
    package = Path(kvxfer.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                assert not bases & tree_names, f"{node.name} in {path.relative_to(package)} belongs in errors.py"


def test_import_loads_neither_asyncio_nor_kernel_planners():
    import subprocess
    import sys

    code = (
        "import sys, kvxfer; print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith("
        "('kvxfer.kernels', 'kvxfer.aio'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    code = "import kvxfer, sys; kvxfer.aio.wait; from kvxfer import aio; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "True"  # still there when asked for
