import pytest

from medmax.paths import PathEscapeError, resolve_inside


def test_paths_inside_the_root_resolve_and_escapes_are_refused(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"y")
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    assert resolve_inside(root, "img/a.png") == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, "img/../img/a.png") == (root / "img" / "a.png").resolve()
    for bad in ("../secret.png", "img/link.png", str(tmp_path / "secret.png")):
        with pytest.raises(PathEscapeError, match="leaves"):
            resolve_inside(root, bad)
