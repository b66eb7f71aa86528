"""Schema versions: each validator brings its database up to date at start, once per step."""

import pytest

import child
import common
import parent


def versions(db):
    return [row["version"] for row in db.query("select version from schema_version order by 1")]


def test_each_step_runs_once_in_order_and_a_newer_database_is_refused(make_dsn):
    dsn = make_dsn()
    steps = ["create table t (a integer)", "alter table t add column b text"]
    db = common.Database(dsn, steps[:1])
    assert versions(db) == [1]
    db.close()
    db = common.Database(dsn, steps)  # the upgrade: only step 2 runs
    db.query("insert into t (a, b) values (1, 'x')")
    assert versions(db) == [1, 2]
    db.close()
    db = common.Database(dsn, steps)  # a restart: nothing runs (step 1 would fail if it did)
    assert versions(db) == [1, 2]
    db.close()
    with pytest.raises(common.ConfigError, match="has schema version 2, newer than this "
                                                  "validator's 1: run the newer version"):
        common.Database(dsn, steps[:1])


@pytest.mark.parametrize("schema", [parent.SCHEMA, child.SCHEMA], ids=["parent", "child"])
def test_the_roles_schemas_apply_to_a_fresh_database_and_again(make_dsn, schema):
    dsn = make_dsn()
    for _ in range(2):
        db = common.Database(dsn, schema)
        assert versions(db) == list(range(1, len(schema) + 1))
        db.close()
