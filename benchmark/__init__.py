"""Runs a submission as Codabench would: timing, accuracy, the time-limit verdict, and the upload zip."""
