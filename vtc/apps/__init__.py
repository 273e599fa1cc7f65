"""Applications built on the engine: the ``vtc`` command, demos, pictures of records, video decoding, the video
QA pipeline and the lmms-eval plugin. Nothing in the engine imports this package."""
