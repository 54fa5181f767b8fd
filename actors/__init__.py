"""Ray actors: thin shells around the plain classes in pipeline/ and rewards/ (the Ray pipeline issue)."""
