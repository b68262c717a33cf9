import pytest
from hypothesis import given, strategies as st

from ucp import Topology, TopologyError


def test_parse_and_str_round_trip():
    t = Topology.parse("dp=2,tp=2,pp=1,zero=1")
    assert (t.dp, t.tp, t.pp, t.ep, t.sp, t.zero) == (2, 2, 1, 1, 1, 1)
    assert str(t) == "dp=2,tp=2,pp=1,zero=1"
    assert Topology.parse(str(t)) == t
    assert str(Topology.parse("ep=2, dp=4")) == "dp=4,tp=1,pp=1,ep=2,zero=0"


@pytest.mark.parametrize("text", ["", "dp=0", "dp=2,dp=2", "xx=2", "dp=two", "zero=4", "dp"])
def test_parse_rejects(text):
    with pytest.raises(TopologyError):
        Topology.parse(text)


def test_error_is_also_value_error():
    with pytest.raises(ValueError):
        Topology.parse("dp=-1")


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 2), st.data())
def test_rank_coords_bijection(dp, tp, pp, ep, data):
    t = Topology(dp=dp, tp=tp, pp=pp, ep=ep)
    seen = set()
    for r in range(t.world_size):
        c = t.coords(r)
        assert t.rank(**c) == r
        seen.add(tuple(sorted(c.items())))
    assert len(seen) == t.world_size
    r = data.draw(st.integers(0, t.world_size - 1))
    assert t.group(r, "tp") == [t.rank(**{**t.coords(r), "tp": i}) for i in range(tp)]
    assert r in t.group(r, "dp")


def test_tp_is_fastest_axis():
    t = Topology(dp=2, tp=2, pp=2)
    assert [t.coords(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert t.coords(4)["pp"] == 1
    with pytest.raises(TopologyError):
        t.coords(8)
