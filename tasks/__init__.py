"""Standardized NeuronBench tasks: one file per task, each declaring a frozen spec."""
