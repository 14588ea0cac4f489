"""`hlo` reads what moves between devices, and the loops around it, off a compiled program's text."""

import textwrap

from catjax import hlo


def test_collectives_include_combined_async_and_root_ones():
    text = textwrap.dedent("""
        %all-reduce.1 = (f32[64]{0}, f32[64,512]{1,0}) all-reduce(%a, %b), channel_id=1
        %ag = bf16[32,1,8,128]{3,0,2,1:T(8,128)(2,1)S(1)} all-gather-start(%x), dimensions={0}
        %agd = bf16[32,1,8,128]{3,0,2,1} all-gather-done(%ag)
          ROOT %cp = s32[4]{0} collective-permute(%y), source_target_pairs={{0,1}}
        %fusion = f32[8]{0} fusion(%all-gather.2), kind=kLoop, calls=%fused_computation
        %copy = pred[] copy(%p), metadata={op_name="all-reduce("}
    """)
    assert hlo.collectives(text) == [
        ("(f32[64]{0}, f32[64,512]{1,0})", "all-reduce"),
        ("bf16[32,1,8,128]{3,0,2,1:T(8,128)(2,1)S(1)}", "all-gather-start"),
        ("s32[4]{0}", "collective-permute"),
    ]


def test_collectives_in_loops_follow_while_bodies_and_what_they_call():
    text = textwrap.dedent("""
        %fused (p: f32[8]) -> f32[8] {
          %ar.2 = f32[8]{0} all-reduce(%p), channel_id=2
        }

        %body.1 (t: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ag.1 = f32[64,512]{1,0} all-gather(%w), dimensions={0}
          %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused
        }

        %cond.1 (t: (s32[], f32[8])) -> pred[] {
          %c = pred[] compare(%a, %b), direction=LT
        }

        ENTRY %main (a: f32[8]) -> f32[8] {
          %ag.0 = f32[64,512]{1,0} all-gather(%w0), dimensions={0}
          %while.1 = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1
        }
    """)
    assert hlo.collectives(text, in_loops=True) == [
        ("f32[8]{0}", "all-reduce"), ("f32[64,512]{1,0}", "all-gather")]
    assert len(hlo.collectives(text)) == 3


def test_collectives_by_depth_count_the_loops_around_them():
    text = textwrap.dedent("""
        %inner (t: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ar.3 = f32[4]{0} all-reduce(%p), channel_id=3
        }

        %outer (t: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ag.1 = f32[2]{0} all-gather(%w), dimensions={0}
          %while.2 = (s32[], f32[8]) while(%t), condition=%c, body=%inner
        }

        ENTRY %main (a: f32[8]) -> f32[8] {
          %ag.0 = f32[1]{0} all-gather(%w0), dimensions={0}
          %while.1 = (s32[], f32[8]) while(%t), condition=%c, body=%outer
        }
    """)
    assert sorted(hlo.collectives_by_depth(text)) == [
        ("f32[1]{0}", "all-gather", 0), ("f32[2]{0}", "all-gather", 1),
        ("f32[4]{0}", "all-reduce", 2)]


def test_collectives_with_trips_read_each_loops_bound():
    text = textwrap.dedent("""
        %inner_cond (t: (s32[], f32[8])) -> pred[] {
          %c = s32[]{:T(128)} constant(36)
        }

        %inner (t: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ar = f32[4]{0} all-reduce(%p), channel_id=3
        }

        %outer_cond (t: (s32[], f32[8])) -> pred[] {
          %c = s32[] constant(511)
        }

        %outer (t: (s32[], f32[8])) -> (s32[], f32[8]) {
          %w = (s32[], f32[8]) while(%t), condition=%inner_cond, body=%inner
        }

        ENTRY %main (a: f32[8]) -> f32[8] {
          %ag = f32[1]{0} all-gather(%h), dimensions={0}
          %w = (s32[], f32[8]) while(%t), condition=%outer_cond, body=%outer
        }
    """)
    assert sorted(hlo.collectives_with_trips(text)) == [
        ("f32[1]{0}", "all-gather", ()), ("f32[4]{0}", "all-reduce", (511, 36))]
