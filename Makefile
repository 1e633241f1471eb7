# chatmaild: see README.md.  `make test` installs everything it needs itself.
VENV ?= .venv
export VENV
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps test test-here test-other lint bench run deb install uninstall clean

deps:
	./scripts/install-deps.sh

# Both releases: the whole suite on this machine's release, then again inside a booted
# container of the other one (Debian 12 <-> 13; scripts/debian-root.sh), which leaves out
# only the tests that boot machines of both releases themselves (marker "machines").
RELEASE := $(shell . /etc/os-release && echo $$VERSION_CODENAME)
OTHER_RELEASE := $(if $(filter trixie,$(RELEASE)),bookworm,trixie)
CONTAINER_VENV := /var/lib/chatmaild-test/venv

test: test-here test-other

test-here: deps
	$(VENV)/bin/ruff check chatmaild tests bench testing
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-other:
	./scripts/debian-root.sh $(OTHER_RELEASE) run $(MAKE) test-here VENV=$(CONTAINER_VENV) \
		PYTEST_ARGS='-m "not machines" $(PYTEST_ARGS)'

lint: deps
	$(VENV)/bin/ruff check chatmaild tests bench testing
	$(VENV)/bin/ruff format --check chatmaild tests bench testing

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info

# A complete relay on 127.0.0.1 (Ctrl-C stops it): STATE=dir, CONFIG=chatmail.ini overrides,
# PEERS="dir ..." state directories of other local relays to exchange mail with
STATE ?= state
run: deps
	$(PY) -m chatmaild.relay --state $(STATE) $(if $(CONFIG),--config $(CONFIG)) \
		$(foreach peer,$(PEERS),--peer $(peer))

# The Debian package for this machine's release: dist/chatmaild_<version>_all.deb
DIST ?= dist
deb:
	DIST=$(DIST) ./scripts/build-deb.sh

# This host becomes a relay (root, Debian 12 or 13): builds the package for this release
# and installs it with apt; MAIL_DOMAIN=... the first time
install:
	DIST=$(DIST) MAIL_DOMAIN=$(MAIL_DOMAIN) TLS_CERT=$(TLS_CERT) TLS_KEY=$(TLS_KEY) \
		./scripts/install.sh

# apt-get remove chatmaild: everything stops; mail, /etc/chatmail and keys stay
uninstall:
	./scripts/uninstall.sh
