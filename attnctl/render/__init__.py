"""The application on top of the plugin: job files, `attnctl render`, wrapped generation, outputs, loading."""
