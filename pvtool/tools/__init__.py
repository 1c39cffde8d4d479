"""Inspection tools built on the stages and the runtime: the diff view and the benchmarks."""
