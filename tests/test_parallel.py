"""`parallel.collectives` reads what moves between devices off a compiled program's text."""

import textwrap

from catjax import parallel


def test_collectives_include_combined_async_and_root_ones():
    hlo = textwrap.dedent("""
        %all-reduce.1 = (f32[64]{0}, f32[64,512]{1,0}) all-reduce(%a, %b), channel_id=1
        %ag = bf16[32,1,8,128]{3,0,2,1:T(8,128)(2,1)S(1)} all-gather-start(%x), dimensions={0}
        %agd = bf16[32,1,8,128]{3,0,2,1} all-gather-done(%ag)
          ROOT %cp = s32[4]{0} collective-permute(%y), source_target_pairs={{0,1}}
        %fusion = f32[8]{0} fusion(%all-gather.2), kind=kLoop, calls=%fused_computation
        %copy = pred[] copy(%p), metadata={op_name="all-reduce("}
    """)
    assert parallel.collectives(hlo) == [
        ("(f32[64]{0}, f32[64,512]{1,0})", "all-reduce"),
        ("bf16[32,1,8,128]{3,0,2,1:T(8,128)(2,1)S(1)}", "all-gather-start"),
        ("s32[4]{0}", "collective-permute"),
    ]
