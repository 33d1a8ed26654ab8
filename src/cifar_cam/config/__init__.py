"""Configs before anything runs: the names a config may choose, validation per section, the keys that exist,
recipes as command lines, durations, a checkpoint's stored config merged in. Imports the leaves only; no torch."""
