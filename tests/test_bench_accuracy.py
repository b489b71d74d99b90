"""The accuracy suite reads any labelled data set: CLINC-shaped JSON, a folder, or split files.

Each case trains the fast family on a small synthetic data set and checks the report: the title
names the data set, out-of-scope figures appear only where the test split has out-of-scope
rows, the calibration section shows the validation curve and where the rule landed, and
macro-F1 leaves abstentions out of the classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import pytest

from bench import accuracy

INTENTS = {
    "order_status": ["where is my order", "track my parcel", "has my package shipped"],
    "store_hours": ["when does the store open", "closing time tonight", "opening hours sunday"],
    "returns": ["return these shoes", "refund my purchase", "send back a damaged item"],
    "billing": ["charged twice on my card", "wrong amount billed", "dispute a charge"],
}
OUT_OF_SCOPE = ["tell me a joke", "weather in paris", "who won the game", "recipe for soup"]
FILLERS = ["", "please", "hi,", "can you help:", "quick question -", "thanks"]


def rows(per_intent: int, seed: int, oos: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for intent, phrases in INTENTS.items():
        for _ in range(per_intent):
            text = f"{rng.choice(FILLERS)} {rng.choice(phrases)} {rng.choice(FILLERS)}".strip()
            out.append([text, intent])
    for _ in range(oos):
        out.append([f"{rng.choice(FILLERS)} {rng.choice(OUT_OF_SCOPE)}".strip(), "oos"])
    return out


def args_for(out: Path, **given: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    accuracy.add_arguments(parser)
    namespace = parser.parse_args(["--families", "fast", "--out", str(out)])
    for key, value in given.items():
        setattr(namespace, key, value)
    return namespace


def report_of(out: Path) -> tuple[dict, str]:
    return json.loads((out / "accuracy.json").read_text()), (out / "accuracy.md").read_text()


def test_a_clinc_shaped_file_with_out_of_scope_splits(tmp_path: Path) -> None:
    data = {
        "train": rows(12, 1),
        "val": rows(4, 2),
        "test": rows(5, 3),
        "oos_train": [[text, "oos"] for text, _ in rows(0, 4, oos=8)],
        "oos_val": [[text, "oos"] for text, _ in rows(0, 5, oos=4)],
        "oos_test": [[text, "oos"] for text, _ in rows(0, 6, oos=6)],
    }
    folder = tmp_path / "tiny-intents"
    folder.mkdir()
    (folder / "data_full.json").write_text(json.dumps(data))
    (folder / "README.md").write_text("published: 99.9\n")
    out = tmp_path / "out"
    assert accuracy.main(args_for(out, data=folder / "data_full.json")) == 0
    report, markdown = report_of(out)
    assert markdown.startswith("# Plexus accuracy on tiny-intents")
    assert "CLINC150" not in markdown.split("\n")[0]
    (family,) = report["families"]
    assert report["dataset"]["splits"]["test"] == {"rows": 26, "inscope": 20, "oos": 6}
    assert "oos_recall" in family["test_metrics"]
    calibration = family["calibration"]
    assert calibration["rule"]["target"] == "inscope_accuracy"
    assert calibration["threshold"] == family["threshold"]
    assert len(calibration["curve"]) == 100
    assert "calibrated**" in markdown and "where each family's rule landed" in markdown
    assert [item["name"] for item in report["published"]["files"]] == ["README.md"]
    assert (out / "accuracy.png").stat().st_size > 0


def test_a_folder_of_split_files_without_out_of_scope(tmp_path: Path) -> None:
    folder = tmp_path / "helpdesk"
    folder.mkdir()
    with (folder / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows(12, 7))
    (folder / "test.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows(5, 8))
    )
    out = tmp_path / "out"
    assert accuracy.main(args_for(out, data=folder)) == 0
    report, markdown = report_of(out)
    assert markdown.startswith("# Plexus accuracy on helpdesk")
    (family,) = report["families"]
    assert report["dataset"]["test_oos"] == 0
    assert "oos_recall" not in family["test_metrics"]
    assert "oos recall" not in markdown
    assert "no out-of-scope rows" in markdown
    assert "held out (no validation split given)" in markdown
    assert report["published"]["files"] == []  # the split files are data, not results
    assert (out / "accuracy.png").stat().st_size > 0
    assert "answered" in family["curve"][0]


def test_split_files_named_one_by_one(tmp_path: Path) -> None:
    train, val, test = tmp_path / "tr.jsonl", tmp_path / "va.jsonl", tmp_path / "te.jsonl"
    for path, (count, seed) in ((train, (12, 1)), (val, (4, 2)), (test, (4, 3))):
        path.write_text(
            "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows(count, seed))
        )
    out = tmp_path / "out"
    assert accuracy.main(args_for(out, train=train, val=val, test=test, name="mine")) == 0
    report, markdown = report_of(out)
    assert markdown.startswith("# Plexus accuracy on mine")
    assert report["families"][0]["heldout_examples"] == 16


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read it as JSON"),
        ("[]", "expected a JSON object"),
        ('{"train": []}', "missing keys ['test']"),
        ('{"train": [], "test": [], "extra": []}', "unexpected keys ['extra']"),
        ('{"train": [["a", "b", "c"]], "test": []}', "train[0]: expected a [text, label] pair"),
        ('{"train": [], "test": []}', "must not be empty"),
    ],
)
def test_malformed_data_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "data.json"
    path.write_text(content)
    assert accuracy.main(args_for(tmp_path / "out", data=path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plexus bench accuracy: error:") and message in err, err
    assert len(err.splitlines()) == 1


def test_conflicting_or_missing_sources_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert accuracy.main(args_for(tmp_path, data=tmp_path, train=tmp_path / "t.csv")) == 2
    assert "not both" in capsys.readouterr().err
    assert accuracy.main(args_for(tmp_path, train=tmp_path / "t.csv")) == 2
    assert "--train FILE and --test FILE" in capsys.readouterr().err
    assert accuracy.main(args_for(tmp_path, data=tmp_path)) == 2
    assert "expected train and test files" in capsys.readouterr().err
