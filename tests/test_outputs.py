"""Result files are replaced atomically: a failing writer leaves the old file and no temporary."""

import pytest

from msif.atomic import atomic_write, atomic_write_text


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    p = atomic_write_text(tmp_path / "r.json", '{"old": 1}')

    def boom(tmp):
        tmp.write_text('{"new": ')  # half written, then killed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, boom)
    assert p.read_text() == '{"old": 1}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
    atomic_write_text(p, '{"new": 2}')
    assert p.read_text() == '{"new": 2}' and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
