"""Side-by-side benchmarks of lora_kit against PEFT (measured, not timed tests).

Run ``python -m benchmarks.NAME`` (see each module). Every benchmark interleaves its cases
(A B A B ...) in one process after warm-up and reports medians, min-max and ratios, because
whole-model timings on shared machines swing by tens of percent between runs.
"""
