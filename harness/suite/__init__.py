"""The suite application, above the engine and the zoo: the task API and registry, the runner,
sanity checks, regressions, the report page and its plots, the collector benchmark and the zoo
verbs. The command line (`harness.cli`) sits on top."""
