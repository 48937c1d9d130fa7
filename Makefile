# Shortcuts; the scripts are the source of truth.
.PHONY: demo test image

demo:  ## the local demo: stack, two app versions, an update 1.0 -> 2.0 -> 1.0
	scripts/demo

test:  ## what CI runs
	scripts/test

image:  ## the agent/bridge image (BASE_IMAGE=... to change the base)
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t edge-agent .
