"""`make data-d4rl`: the nine paper datasets' addresses, and the check of what is on disk."""

from __future__ import annotations

import urllib.error

from tasks.d4rl import download
from tests.fixtures.d4rl import episode_arrays, recorded_arrays, write_d4rl_dataset, write_d4rl_file


def test_the_nine_paper_datasets_and_their_addresses():
    assert len(download.PAPER_DATASETS) == 9
    assert download.dataset_url("hopper-medium-replay-v2").endswith("/gym_mujoco_v2/hopper_medium_replay-v2.hdf5")


def test_check_accepts_good_files_and_names_the_problem_of_bad_ones(tmp_path, capsys):
    write_d4rl_dataset(tmp_path, "hopper-medium-v2")
    write_d4rl_file(tmp_path / "d4rl" / "walker2d-medium-v2.hdf5", episode_arrays("hopper", [5]))
    code = download.main(
        [
            "--data-dir",
            str(tmp_path),
            "--check",
            "--datasets",
            "hopper-medium-v2",
            "walker2d-medium-v2",
            "halfcheetah-medium-v2",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "[ok] hopper-medium-v2" in out
    assert "walker2d-medium-v2: " in err and "states of size 11 and actions of size 3, expected 17 and 6" in err
    assert "missing " + str(tmp_path / "d4rl" / "halfcheetah-medium-v2.hdf5") in err


def test_without_network_the_message_gives_the_address_and_the_place(tmp_path, monkeypatch):
    def offline(name, root):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(download, "fetch", offline)
    report = download.prepare(tmp_path / "d4rl", ("hopper-medium-v2",))
    assert report["hopper-medium-v2"] == [
        f"could not download {download.dataset_url('hopper-medium-v2')} (Name or service not known); download it by "
        f"hand to {tmp_path / 'd4rl' / 'hopper-medium-v2.hdf5'}"
    ]


def test_check_reports_an_empty_file_instead_of_failing(tmp_path, capsys):
    """`make data-d4rl ARGS=--check` on a file with the five keys and no rows: a report line, no traceback."""
    arrays = {key: value[:0] for key, value in episode_arrays("hopper", [5]).items()}
    path = write_d4rl_file(tmp_path / "d4rl" / "hopper-medium-v2.hdf5", arrays)
    code = download.main(["--data-dir", str(tmp_path), "--check", "--datasets", "hopper-medium-v2"])
    _, err = capsys.readouterr()
    assert code == 1
    assert f"[missing] hopper-medium-v2: {path}: the arrays hold no rows" in err and "make data-d4rl" in err


def test_check_refuses_walker2d_data_named_halfcheetah(tmp_path, capsys):
    write_d4rl_file(tmp_path / "d4rl" / "halfcheetah-medium-v2.hdf5", recorded_arrays("walker2d", [30, 30]))
    code = download.main(["--data-dir", str(tmp_path), "--check", "--datasets", "halfcheetah-medium-v2"])
    _, err = capsys.readouterr()
    assert code == 1 and "[missing] halfcheetah-medium-v2: " in err and "does not come from HalfCheetah-v4" in err
