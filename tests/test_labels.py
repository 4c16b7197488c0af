"""Label rules: markers (map, prefix, hold, end, ignore) and intervals files (CSV, JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossl_stream.config import IntervalLabels, LabelRules, MarkerLabels
from crossl_stream.errors import DatasetError
from crossl_stream.labels import Labels

MARKERS = [(10.0, "stim/neutral"), (20.0, "blink"), (25.0, "stim/disgust"), (40.0, "rest")]


def test_a_label_holds_until_the_next_marker_that_is_not_ignored():
    rules = MarkerLabels(
        prefix="stim/", map={"neutral": "neutral", "disgust": "disgust"}, ignore=("blink",)
    )
    labels = Labels.from_markers(rules, MARKERS)
    # 'blink' and 'rest' lack the prefix: not label markers at all, so neither ends a label
    assert labels.intervals == [(10.0, 25.0, "neutral"), (25.0, np.inf, "disgust")]
    assert labels.label_at(12, 24) == "neutral" and labels.label_at(24, 26) is None
    assert labels.label_at(9, 11) is None and labels.label_at(30, 90) == "disgust"
    assert labels.matched == {"neutral": 1, "disgust": 1} and not labels.unmapped


def test_unmapped_and_end_markers_end_a_label_and_are_counted():
    rules = MarkerLabels(map={"stim/neutral": "neutral", "stim/disgust": "disgust"}, end=("rest",))
    labels = Labels.from_markers(rules, MARKERS)
    assert labels.intervals == [(10.0, 20.0, "neutral"), (25.0, 40.0, "disgust")]
    assert labels.unmapped == {"blink": 1}  # 'rest' is an end marker: not unmapped


def test_a_fixed_hold_is_cut_short_by_the_next_marker():
    rules = MarkerLabels(map={"stim/neutral": "n", "stim/disgust": "d", "rest": None}, hold=8.0)
    labels = Labels.from_markers(rules, MARKERS)
    # the 8 s hold ends 'n' at 18 s, before 'blink' (20 s) would, and 'd' at 33 s
    assert labels.intervals == [(10.0, 18.0, "n"), (25.0, 33.0, "d")]
    ends = np.array([12.0, 18.0, 19.0, 30.0, 34.0])
    assert labels.labels_of(ends, 2.0) == ["n", "n", None, "d", None]


def test_without_a_map_each_marker_is_its_class():
    labels = Labels.from_markers(MarkerLabels(end=("rest",)), MARKERS)
    assert labels.names == ["stim/neutral", "blink", "stim/disgust"]


def test_intervals_from_csv_and_json_on_the_recording_clock_or_relative(tmp_path):
    recording = tmp_path / "sub-01_ses-1.xdf"
    (tmp_path / "sub-01_ses-1.csv").write_text("start,end,label\n1000,1010,walk\n1012,1020,run\n")
    rules = IntervalLabels(path="{stem}.csv")
    labels = Labels.from_file(rules, recording, start=995.0)
    assert labels.intervals == [(1000.0, 1010.0, "walk"), (1012.0, 1020.0, "run")]
    rows = [{"start": 5, "end": 15, "label": "walk"}, {"start": 17, "end": 25, "label": "x"}]
    (tmp_path / "labels.json").write_text(json.dumps(rows))
    rules = IntervalLabels(path="labels.json", time="relative", map={"walk": "walking"})
    labels = Labels.from_file(rules, recording, start=995.0)
    assert labels.intervals == [(1000.0, 1010.0, "walking")] and labels.unmapped == {"x": 1}


def test_bad_intervals_files_say_what_is_wrong(tmp_path):
    recording = tmp_path / "r.xdf"
    with pytest.raises(DatasetError, match="labels file not found"):
        Labels.from_file(IntervalLabels(path="{stem}.csv"), recording, 0.0)
    (tmp_path / "r.csv").write_text("begin,stop,what\n1,2,a\n")
    with pytest.raises(DatasetError, match=r"r.csv: not a labels file \(need start, end, label"):
        Labels.from_file(IntervalLabels(path="{stem}.csv"), recording, 0.0)
    (tmp_path / "r.csv").write_text("start,end,label\n1,5,a\n4,8,b\n")
    with pytest.raises(DatasetError, match=r"labels overlap: 'a' \[1, 5\) and 'b' from 4"):
        Labels.from_file(IntervalLabels(path="{stem}.csv"), recording, 0.0)


def test_rules_choose_one_source_and_a_marker_stream_by_name(tmp_path):
    with pytest.raises(ValueError, match="exactly one of markers, intervals"):
        LabelRules()
    rules = LabelRules(markers=MarkerLabels(stream="Stim"))
    streams = {"Stim": [(1.0, "a"), (5.0, "b")], "Notes": [(2.0, "c")]}
    labels = Labels.of(rules, tmp_path / "r.xdf", 0.0, streams)
    assert labels.intervals == [(1.0, 5.0, "a"), (5.0, np.inf, "b")]
    with pytest.raises(
        DatasetError, match=r"no marker stream 'Events'; it has \['Notes', 'Stim'\]"
    ):
        Labels.of(LabelRules(markers=MarkerLabels(stream="Events")), tmp_path / "r.xdf", 0, streams)


def test_a_class_marked_again_while_it_holds_is_one_stretch_and_ties_keep_their_order():
    markers = [(0.0, "PEN"), (5.0, "PEN"), (9.0, "rest"), (9.0, "PEN"), (20.0, "end")]
    labels = Labels.from_markers(MarkerLabels(end=("end",)), markers)
    # 'rest' and 'PEN' at 9 s: in recorded order, so 'rest' lasts no time and PEN holds on
    assert labels.intervals == [(0.0, 9.0, "PEN"), (9.0, 20.0, "PEN")]
    assert labels.label_at(4.0, 6.0) == "PEN"  # across the repeated marker
