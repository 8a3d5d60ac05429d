"""The plans: pure functions of the config that say who holds what and what crosses.

Nothing here imports torch (a test proves it), so a plan can be read, printed and
checked by hand, by the cost model and by the report without starting a process.
The runners execute these plans; the dry run runs the runners; nothing restates them.

    split       near-equal splits of a width or a batch
    traffic     the ring wire model, the metric payload, per-role traffic records
    stages      which contiguous layers each pipeline stage holds
    schedule    pipeline schedules as per-rank action lists, their validation and lowering
    tensor      tensor-parallel shard plans and their collectives
    data        data-parallel row shares and the gradient all-reduce
"""
