"""The store's Lua scripts: shipped as package data, loaded from it, contract on top."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import redis.asyncio

import streams
from streams import cluster_io, store_io
from streams.settings import Settings
from streams.store import StateStore
from streams.store_io import lua_script

REPO_ROOT = Path(__file__).resolve().parents[2]
LUA_DIR = Path(streams.__file__).parent / "lua"
# Scripts, each run with the fragments (functions) it needs prepended.
SCRIPTS = {
    "read": ("user_read",),
    "write": ("user_write",),
    "rebase": (),
    "read_user": ("user_read",),
    "write_user": ("user_write",),
    "write_shared": (),
}
FRAGMENTS = ("user_read", "user_write")


def _text(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def _joined(name: str) -> str:
    return "\n".join(_text(part) for part in (*SCRIPTS[name], name))


def test_the_stores_register_the_scripts_in_streams_lua() -> None:
    io = StateStore(redis.asyncio.Redis(), Settings())._io
    assert isinstance(io, store_io.BatchScripts)
    registered = {"read": io._read, "write": io._write, "rebase": io._rebase}
    assert _joined("read_user") == cluster_io.READ_USER_SCRIPT
    assert _joined("write_user") == cluster_io.WRITE_USER_SCRIPT
    assert _joined("write_shared") == cluster_io.WRITE_SHARED_SCRIPT
    for name, script in registered.items():
        assert script.script == _joined(name)
    assert sorted(path.stem for path in LUA_DIR.glob("*.lua")) == sorted([*SCRIPTS, *FRAGMENTS])


def test_each_script_states_its_keys_and_argv_at_the_top() -> None:
    for name in SCRIPTS:
        header = _header(name)
        assert "KEYS[1]" in header and "ARGV[1]" in header and "Returns" in header, name
    for name in FRAGMENTS:  # a fragment says what it defines and who runs it
        assert "prepended" in _header(name), name


def _header(name: str) -> str:
    """The comment lines a script starts with."""
    lines = lua_script(name).splitlines()
    return "\n".join(
        line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("--"))]
    )


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip install` would build, from a copy of the sources (no build/ left here)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for package in (
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ):
        shutil.copytree(
            REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=source, check=True, capture_output=True
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def test_an_installed_package_loads_its_scripts(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        for name in SCRIPTS:
            assert archive.read(f"streams/lua/{name}.lua") == (LUA_DIR / f"{name}.lua").read_bytes()
    # Imported from the wheel itself (a zip on sys.path), not from this checkout.
    probe = (
        "import sys, streams.store_io as s; "
        "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
        "print(s.READ_SCRIPT + s.WRITE_SCRIPT + s.REBASE_SCRIPT, end='')"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(wheel)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(wheel), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "".join(_joined(name) for name in ("read", "write", "rebase"))
