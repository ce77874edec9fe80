"""The store's Lua scripts: shipped as package data, loaded from it, contract on top."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import redis.asyncio

import streams
from streams.settings import Settings
from streams.store import StateStore, lua_script

REPO_ROOT = Path(__file__).resolve().parents[2]
LUA_DIR = Path(streams.__file__).parent / "lua"
SCRIPTS = ("read", "write", "rebase")


def test_the_store_registers_the_scripts_in_streams_lua() -> None:
    store = StateStore(redis.asyncio.Redis(), Settings())
    registered = {"read": store._read, "write": store._write, "rebase": store._rebase}
    for name, script in registered.items():
        assert script.script == (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
    assert sorted(path.stem for path in LUA_DIR.glob("*.lua")) == sorted(SCRIPTS)


def test_each_script_states_its_keys_and_argv_at_the_top() -> None:
    for name in SCRIPTS:
        header = lua_script(name).split("\nlocal ", 1)[0]
        assert all(line.startswith("-- ") for line in header.splitlines()), name
        assert "KEYS[1]" in header and "ARGV[1]" in header and "Returns" in header, name


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
        "import sys, streams.store as s; "
        "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
        "print(s._READ_SCRIPT + s._WRITE_SCRIPT + s._REBASE_SCRIPT, end='')"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(wheel)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(wheel), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "".join(lua_script(name) for name in SCRIPTS)
