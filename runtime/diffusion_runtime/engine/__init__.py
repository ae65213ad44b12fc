"""The engine: loading and optimizing the pipeline, running it (one process or several ranks behind one
interface, `engine.interface.Engine`), and the one queue in front of it. It never imports `api`."""
