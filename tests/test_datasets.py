"""Raw dataset parsers on the real files (../shared/data) and on small hand-made bad files."""

import collections
import json

import pytest

from sparsewsi.datasets import (
    DatasetFileError,
    FeatureIndex,
    read_slide_instruction,
    read_slidebench_caption,
    read_slidebench_vqa,
    read_wsi_vqa,
    resolve_feature_file,
    sha256_file,
)

SHA = {
    "SlideBench-VQA-BCNB.csv": "10b83c6177bd13bee9471fb0bd54b7d500e7eccdb7e52b462424ed50cb259e0b",
    "SlideBench-Caption-TCGA.csv": "db442a40463877118de8b8274a42edbbc08997fbda93c539608d15d1a99e6acb",
}


def test_bcnb_real_file(shared_data):
    parsed = read_slidebench_vqa(shared_data / "SlideBench-VQA-BCNB.csv")
    assert parsed.layout == "slidebench-vqa-bcnb" and parsed.sha256 == SHA["SlideBench-VQA-BCNB.csv"]
    assert parsed.num_rows == 7274 and len(parsed.records) == 7274 and not parsed.problems
    tasks = collections.Counter(r.task for r in parsed.records)
    assert tasks == {"Tumor": 1058, "ER": 1058, "PR": 1058, "HER2": 1058, "HER2 Expression": 1058,
                     "Molecular subtype": 1058, "Histological grading": 926}
    assert collections.Counter(len(r.options) for r in parsed.records) == {2: 3174, 3: 1984, 4: 2116}
    assert len({r.slide_id for r in parsed.records}) == 1058
    first = parsed.records[0]
    assert (first.question_id, first.slide_id, first.answer, first.answer_text) == ("0", "1", "C", "Other")
    assert list(first.options) == ["A", "B", "C"]
    assert all(r.answer in r.options and r.options[r.answer] == r.answer_text for r in parsed.records)


def test_caption_real_file(shared_data):
    parsed = read_slidebench_caption(shared_data / "SlideBench-Caption-TCGA.csv")
    assert parsed.sha256 == SHA["SlideBench-Caption-TCGA.csv"]
    assert len(parsed.records) == parsed.num_rows == 734 and not parsed.problems
    assert collections.Counter(r.tumor for r in parsed.records)["BRCA"] == 187
    assert parsed.records[0].slide_id == "TCGA-DK-A3IS-01Z-00-DX1"


def test_wsivqa_real_files(shared_data):
    train = read_wsi_vqa(shared_data / "WsiVQA_train.json")
    val = read_wsi_vqa(shared_data / "WsiVQA_val.json")
    assert (len(train.records), len(val.records)) == (7139, 798)
    assert (train.counts["closed"], train.counts["open"]) == (3724, 3415)
    assert (val.counts["closed"], val.counts["open"]) == (421, 377)
    assert train.counts["answer_not_among_choices"] == 29 and val.counts["answer_not_among_choices"] == 0
    assert train.counts["answer_matched_after_normalization"] + train.counts["answer_unmatched"] == 29
    mc = [r.as_multiple_choice() for r in val.records if r.closed]
    assert all(q is not None and q.answer_text == r.choices[r.answer_index] for q, r in zip(mc, [r for r in val.records if r.closed]))
    assert len({r.item_id for r in train.records}) == 7139


def test_slideinstruct_real_example(shared_data):
    parsed = read_slide_instruction(shared_data / "slideinstruct_train_example.json", stage=2)
    assert len(parsed.records) == 3 and not parsed.problems
    rec = parsed.records[0]
    assert rec.slide_id == "TCGA-A7-A0CJ-01Z-00-DX2" and rec.image_file.endswith(".csv")
    assert [r for r, _ in rec.turns] == ["user", "assistant"] and "<image>" not in rec.turns[0][1]


TCGA_HEADER = ",ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"


def test_tcga_layout_with_index_column_and_bad_rows(tmp_path):
    rows = [
        '0,q1,TCGA-05-4244-01Z-00-DX1,LUAD,Diagnosis,Subtype,"Which, type?",LUAD,LUSC,,,B\n',
        "1,q2,TCGA-05-4245-01Z-00-DX1,LUAD,Microscopy,Cells,What?,a,b,c,d,E\n",  # bad letter
        "2,q3,TCGA-05-4246-01Z-00-DX1,LUAD,Microscopy,Cells,What?,a,,,,A\n",  # one option
        "3,q4,TCGA-05-4247-01Z-00-DX1,LUAD,Clinical,Stage,What?,a,b,c\n",  # short row
        "4,q5,TCGA-05-4248-01Z-00-DX1,LUAD,Clinical,Stage,What?,a,b,,,C\n",  # answer letter of an empty option
        "5,q1,TCGA-05-4249-01Z-00-DX1,LUAD,Clinical,Stage,What?,a,b,c,d,d\n",  # duplicate id
        "6,q7,,LUAD,Clinical,Stage,What?,a,b,c,d,A\n",  # no slide
        "7,q8,TCGA-05-4250-01Z-00-DX1,BRCA,Clinical,Stage,Why?,a,b,c,d,d\n",  # lower-case answer: fine
    ]
    path = tmp_path / "SlideBench-VQA-TCGA.csv"
    path.write_text(TCGA_HEADER + "".join(rows))
    parsed = read_slidebench_vqa(path)
    assert parsed.layout == "slidebench-vqa-tcga" and parsed.counts["leading_index_column"] == 1
    assert [r.question_id for r in parsed.records] == ["q1", "q8"]
    q = parsed.records[0]
    assert (q.question, q.options, q.answer, q.answer_text) == ("Which, type?", {"A": "LUAD", "B": "LUSC"}, "B", "LUSC")
    assert (q.tumor, q.broad_category, q.narrow_category, q.task) == ("LUAD", "Diagnosis", "Subtype", "")
    assert parsed.records[1].answer == "D"
    got = {(p.row, p.item_id, p.reason) for p in parsed.problems}
    assert got == {(2, "q2", "answer_not_among_options"), (3, "q3", "too_few_options"), (4, "", "unreadable_row"),
                   (5, "q5", "answer_not_among_options"), (6, "q1", "duplicate_id"), (7, "q7", "missing_field")}
    assert parsed.num_rows == 8 and "kept" in parsed.summary()


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist"):
        read_slidebench_vqa(tmp_path / "nope.csv")
    bad = tmp_path / "x.csv"
    bad.write_text("ID,Slide,Question\n1,2,3\n")
    with pytest.raises(DatasetFileError, match="neither a SlideBench-VQA"):
        read_slidebench_vqa(bad)
    with pytest.raises(DatasetFileError, match="lacks column"):
        read_slidebench_caption(bad)
    js = tmp_path / "x.json"
    js.write_text("{not json")
    with pytest.raises(DatasetFileError, match=str(js)):
        read_wsi_vqa(js)
    import hashlib

    assert sha256_file(js) == hashlib.sha256(b"{not json").hexdigest()


def test_wsivqa_and_instruction_bad_rows(tmp_path):
    js = tmp_path / "w.json"
    js.write_text(json.dumps([
        {"Id": "TCGA-AA-0001", "Question": "q?", "Choice": ["x", "y"], "Answer": "y."},
        {"Id": "TCGA-AA-0001", "Question": "q?", "Choice": ["x"], "Answer": "x"},
        {"Id": "", "Question": "q?", "Answer": "a"},
        "junk",
    ]))
    parsed = read_wsi_vqa(js)
    assert len(parsed.records) == 1 and parsed.records[0].answer_index == 1
    assert [(p.row, p.reason) for p in parsed.problems] == [(2, "bad_choices"), (3, "missing_field"), (4, "missing_field")]
    ins = tmp_path / "i.json"
    ins.write_text(json.dumps([
        {"id": "a", "image": ["S.csv"], "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "b", "image": ["S.csv", "T.csv"], "conversations": []},
        {"id": "c", "image": "S.csv", "conversations": [{"from": "gpt", "value": "A"}]},
        {"id": "d", "image": "S.csv", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]))
    parsed = read_slide_instruction(ins, stage=1)
    assert [r.item_id for r in parsed.records] == ["a", "d"] and parsed.records[0].turns[0] == ("user", "Q")
    assert [(p.item_id, p.reason) for p in parsed.problems] == [("b", "bad_image"), ("c", "bad_conversation")]
    assert parsed.counts["no_image_placeholder"] == 1 and parsed.records[0].dataset == "SlideInstruction-stage1"


def test_feature_resolution(tmp_path):
    (tmp_path / "LUAD").mkdir()
    (tmp_path / "LUAD" / "TCGA-05-4244-01Z-00-DX1.csv").write_text("x")
    (tmp_path / "TCGA-05-4244-01Z-00-DX1.h5").write_text("x")
    (tmp_path / "TCGA-PL-A8LZ-01Z-00-DX1.h5").write_text("x")
    (tmp_path / "BRCA").mkdir()
    (tmp_path / "BRCA" / "TCGA-A7-A0CJ-01Z-00-DX2.csv").write_text("x")
    index = FeatureIndex(tmp_path)
    for find in (lambda *a, **k: resolve_feature_file(tmp_path, *a, **k), index.lookup):
        assert find("TCGA-05-4244-01Z-00-DX1", tumor="LUAD").parent.name == "LUAD"
        assert find("TCGA-05-4244-01Z-00-DX1").name.endswith(".h5")
        assert find("TCGA-A7-A0CJ-01Z-00-DX2").parent.name == "BRCA"
        assert find("TCGA-PL-A8LZ") is None
        assert find("TCGA-PL-A8LZ", prefix=True).name == "TCGA-PL-A8LZ-01Z-00-DX1.h5"
        assert find("missing") is None
