#!/bin/sh
# certbot deploy hook: copy the renewed certificate where the hato user can read it and
# tell Hato to reload it (it also notices changed files on its own within seconds).
# Install: install -m 0755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/hato
set -eu
domain=${HATO_CERT_DOMAIN:-dbmx.net}
dest=/var/lib/hato/tls
install -d -o hato -g hato -m 0700 "$dest"
install -o hato -g hato -m 0644 "/etc/letsencrypt/live/$domain/fullchain.pem" "$dest/fullchain.pem.new"
install -o hato -g hato -m 0600 "/etc/letsencrypt/live/$domain/privkey.pem" "$dest/privkey.pem.new"
mv "$dest/privkey.pem.new" "$dest/privkey.pem"
mv "$dest/fullchain.pem.new" "$dest/fullchain.pem"
systemctl reload hato
