"""The process a run lives in: host setup for every entry point (`host`), CPU devices and
data parallelism (`parallel`), huge pages for the C heap (`hostmem`)."""
