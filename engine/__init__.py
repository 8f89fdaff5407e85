"""The human-in-the-loop stages of the data engine: assisted-manual annotation on a Ray
Serve service with a browser page, semi-automatic annotation (pre-filled confident masks,
Label Studio tasks), and the simulated annotator that drives both in tests."""
