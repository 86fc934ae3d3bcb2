"""ComfyUI provider: a transport per agent (``client``), its frames as typed ``messages``, one
job's ``run``, the agent ``pool``, ``workflows`` (graph + binding per task) and ``settings``.

Import from the modules: this package imports nothing, so reading the settings types (as the
app's configuration does) does not load the HTTP stack.
"""
