"""Hive/directory partitions on read and write, and repartition by key,
against pyarrow's own reading of the same files."""
from __future__ import annotations

import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import flowcore.data as fd
from flowcore.data import DataContext
from flowcore.data.datasource import (PartitionStyle, Partitioning, PathPartitionFilter,
                                      PathPartitionParser)


@pytest.fixture(scope="module", autouse=True)
def _cluster(cluster):
    yield cluster


@pytest.fixture(params=["one task", "distributed"])
def mode(request):
    """Both the single-task fast path and the map/reduce tasks."""
    ctx = DataContext.get_current()
    old = ctx.small_plan_bytes, ctx.small_shuffle_bytes
    if request.param == "distributed":
        ctx.small_plan_bytes = ctx.small_shuffle_bytes = 0
    yield request.param
    ctx.small_plan_bytes, ctx.small_shuffle_bytes = old


def _rows(n: int = 60) -> list[dict]:
    return [{"year": 2020 + i % 3, "city": ["oslo", "rome", "a b/c"][i % 3 if i % 5 else 0],
             "v": i} for i in range(n)]


def test_write_parquet_partition_cols_is_hive_and_pyarrow_reads_it(tmp_path, mode):
    out = tmp_path / "t"
    fd.from_items(_rows(), override_num_blocks=4).write_parquet(str(out),
                                                                partition_cols=["year", "city"])
    dirs = sorted(os.path.relpath(r, out) for r, _, files in os.walk(out) if files)
    assert dirs and all(d.count("=") == 2 and d.startswith("year=") for d in dirs)
    assert "year=2022/city=a%20b%2Fc" in dirs          # values are URL-quoted
    for root, subdirs, files in os.walk(out):          # private to the user
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600
            assert pq.read_schema(os.path.join(root, f)).names == ["v"]   # keys not in files
    want = pds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert sorted(zip(want["v"].to_pylist(), want["year"].to_pylist())) == \
        sorted((r["v"], r["year"]) for r in _rows())
    # read back: hive partitioning is read_parquet's default; values are strings
    back = fd.read_parquet(str(out)).take_all()
    assert sorted((r["v"], r["year"], r["city"]) for r in back) == \
        sorted((r["v"], str(r["year"]), r["city"]) for r in _rows())
    typed = fd.read_parquet(str(out), partitioning=Partitioning(
        "hive", field_types={"year": int})).take_all()
    assert sorted((r["v"], r["year"]) for r in typed) == sorted((r["v"], r["year"])
                                                               for r in _rows())
    assert set(fd.read_parquet(str(out), partitioning=None).columns()) == {"v"}
    only = fd.read_parquet(str(out), columns=["v", "city"]).take_all()
    assert set(only[0]) == {"v", "city"} and len(only) == 60


def test_partition_filter_prunes_files_before_reading(tmp_path):
    out = tmp_path / "t"
    fd.from_items(_rows()).write_parquet(str(out), partition_cols=["year"])
    keep = PathPartitionFilter.of(lambda p: p["year"] == "2021", base_dir=str(out))
    rows = fd.read_parquet(str(out), partition_filter=keep).take_all()
    assert rows and {r["year"] for r in rows} == {"2021"}
    assert sorted(r["v"] for r in rows) == [r["v"] for r in _rows() if r["year"] == 2021]
    # a filter's parser reads paths the same way the read does
    p = PathPartitionParser.of(PartitionStyle.HIVE, field_types={"year": int})
    assert p(f"{out}/year=2021/x.parquet") == {"year": 2021}


def test_csv_and_json_read_hive_dirs_and_dir_style(tmp_path):
    for y in (2020, 2021):
        d = tmp_path / "csv" / f"year={y}"
        d.mkdir(parents=True)
        (d / "a.csv").write_text("x\n1\n2\n")
        j = tmp_path / "json" / str(y) / "eu"
        j.mkdir(parents=True)
        (j / "a.json").write_text('{"x": 1}\n')
    rows = fd.read_csv(str(tmp_path / "csv")).take_all()
    assert sorted((r["year"], r["x"]) for r in rows) == [("2020", 1), ("2020", 2),
                                                          ("2021", 1), ("2021", 2)]
    dirp = Partitioning("dir", base_dir=str(tmp_path / "json"), field_names=["year", "region"],
                        field_types={"year": int})
    rows = fd.read_json(str(tmp_path / "json"), partitioning=dirp).take_all()
    assert sorted((r["year"], r["region"], r["x"]) for r in rows) == [(2020, "eu", 1),
                                                                       (2021, "eu", 1)]
    # the default of read_text is no partitioning, as Ray's
    (tmp_path / "txt" / "k=1").mkdir(parents=True)
    (tmp_path / "txt" / "k=1" / "a.txt").write_text("hi\n")
    assert fd.read_text(str(tmp_path / "txt")).take_all() == [{"text": "hi"}]
    assert fd.read_text(str(tmp_path / "txt"), partitioning=Partitioning("hive")).take_all() \
        == [{"text": "hi", "k": "1"}]


def test_partitioning_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="field_names"):
        Partitioning("dir")
    with pytest.raises(ValueError, match="'hive' or 'dir'"):
        Partitioning("range")
    with pytest.raises(TypeError, match="field_types"):
        Partitioning("hive", field_types={"a": list})
    (tmp_path / "2020" / "x").mkdir(parents=True)
    (tmp_path / "2020" / "x" / "a.csv").write_text("v\n1\n")
    with pytest.raises(ValueError, match="base_dir"):   # 2 levels, 1 name: fails at plan time
        fd.read_csv(str(tmp_path), partitioning=Partitioning(
            "dir", base_dir=str(tmp_path), field_names=["year"]))
    with pytest.raises(TypeError, match="Partitioning"):
        fd.read_csv(str(tmp_path), partitioning="hive")
    with pytest.raises(ValueError, match="not columns"):
        fd.range(3).write_parquet(str(tmp_path / "o"), partition_cols=["nope"])
    with pytest.raises(TypeError, match="list of column names"):
        fd.range(3).write_parquet(str(tmp_path / "o2"), partition_cols="id")
    (tmp_path / "clash" / "v=9").mkdir(parents=True)
    pq.write_table(pa.table({"v": [1]}), str(tmp_path / "clash" / "v=9" / "a.parquet"))
    with pytest.raises(Exception, match="different values"):
        fd.read_parquet(str(tmp_path / "clash")).take_all()


def test_repartition_by_keys_puts_each_key_in_one_block(mode):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 13, 400)
    names = np.array(["x", "y", "zz", None], dtype=object)[rng.integers(0, 4, 400)]
    ds = fd.from_items([{"k": int(k), "s": s, "v": i} for i, (k, s) in
                        enumerate(zip(keys, names))], override_num_blocks=5)
    out = ds.repartition(4, keys=["k", "s"], sort=True).materialize()
    assert out.num_blocks() == 4
    seen: dict = {}
    total = 0
    for i, ref in enumerate(out.to_arrow_refs()):
        import flowcore
        t = flowcore.get(ref)
        total += t.num_rows
        pairs = list(zip(t["k"].to_pylist(), t["s"].to_pylist()))
        assert pairs == sorted(pairs, key=lambda p: (p[0], p[1] is None, p[1] or ""))
        for p in pairs:
            assert seen.setdefault(p, i) == i, f"key {p} in blocks {seen[p]} and {i}"
    assert total == 400 and len(seen) == len(set(zip(keys.tolist(), names.tolist())))
    with pytest.raises(ValueError, match="keys="):
        ds.repartition(2, sort=True)
    with pytest.raises(TypeError, match="list of column names"):
        ds.repartition(2, keys="k")
    with pytest.warns(UserWarning, match="ignored"):
        assert ds.repartition(target_num_rows_per_block=100, keys=["k"]).count() == 400
