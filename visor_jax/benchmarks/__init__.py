"""Benchmarks: commands that print tables (ratios measured in one run), never timed tests."""


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo): every table says which machine it is from."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"
